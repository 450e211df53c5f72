//! The `gatehouse` command line: run, validate, schema, explain, keygen, and the PostgreSQL config
//! store's migrate, config push and config pull.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "gatehouse", version, about = "An API gateway on Pingora")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The config file.
        #[arg(short, long, default_value = "conf/gatehouse.yaml")]
        config: PathBuf,
        /// Take over the listeners of a running Gatehouse that is sent SIGQUIT (graceful upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Detach into the background.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Check a config file; print every error with its path. Exit status 1 if any.
    Validate {
        /// The config file (YAML or JSON); `-` reads the document from standard input.
        file: PathBuf,
        /// `text` for people; `json` for programs: one object on stdout, with `ok` and either
        /// the counts and hash or every error's `path` and `message`.
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        format: OutputFormat,
    },
    /// Print the JSON Schema of the config file.
    Schema,
    /// Ask a running Gatehouse's ops listener whether it is ready (`GET /readyz`): exit status
    /// 0 when it answers 200, 1 otherwise. For container health checks, where no HTTP client is
    /// installed.
    Health {
        /// The ops listener's address.
        #[arg(long, default_value = "127.0.0.1:9901", env = "GATEHOUSE_OPS_ADDRESS")]
        address: String,
        /// The path to ask.
        #[arg(long, default_value = "/readyz")]
        path: String,
        /// How long to wait for the whole answer.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
    /// Make a new API key: print it once, with the hash to put in the consumer's credentials.
    Keygen {
        /// Hash with HMAC-SHA-256 using the server secret in this environment variable (the
        /// value of `auth.api_key_secret`), instead of plain SHA-256.
        #[arg(long, value_name = "ENV_VAR")]
        hmac_secret_env: Option<String>,
    },
    /// Show which route a request would match, the candidates it beat, and its filter chain.
    Explain {
        /// The config file.
        #[arg(short, long, default_value = "conf/gatehouse.yaml")]
        config: PathBuf,
        #[arg(short = 'X', long, default_value = "GET")]
        method: String,
        #[arg(long)]
        host: Option<String>,
        /// Request headers as `name: value`.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// The request path (with query, if any).
        path: String,
    },
    /// Apply the PostgreSQL config store's schema migrations that are not applied yet.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// The config in PostgreSQL: push a YAML file as a new version, or pull the live one.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// `postgres://user[:password]@host[:port]/database`.
    #[arg(long, env = "GATEHOUSE_DATABASE_URL")]
    database_url: String,
    /// The schema holding the config tables (created by `migrate` if missing).
    #[arg(long)]
    schema: Option<String>,
    /// `disable` or `require` (TLS mandatory, server certificate verified).
    #[arg(long, default_value = "disable")]
    tls: String,
    /// CA certificates (PEM) that verify the server with `--tls require`.
    #[arg(long)]
    ca_file: Option<String>,
}

impl DatabaseArgs {
    fn database(&self) -> anyhow::Result<gatehouse::config::source::postgres::Database> {
        let mode = match self.tls.as_str() {
            "disable" => gatehouse::config::model::PostgresTlsMode::Disable,
            "require" => gatehouse::config::model::PostgresTlsMode::Require,
            other => anyhow::bail!("--tls {other}: use disable or require"),
        };
        Ok(gatehouse::config::source::postgres::Database::new(
            &self.database_url,
            self.schema.as_deref(),
            mode,
            self.ca_file.as_deref(),
            std::time::Duration::from_secs(10),
        )?)
    }
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Validate a YAML config file, then store it as one new version (replacing the stored one).
    Push {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
        /// Recorded in `config_versions.author` (default: $USER).
        #[arg(long)]
        author: Option<String>,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Print the live database config as YAML.
    Pull {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start a runtime")
        .block_on(future)
}

fn database_command(label: &str, action: impl FnOnce() -> anyhow::Result<String>) -> ExitCode {
    match action() {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("gatehouse {label}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            upgrade,
            daemon,
        } => {
            match gatehouse::server::run(&config, gatehouse::server::RunOptions { upgrade, daemon })
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("gatehouse: {}: {error}", config.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { file, format } => validate(&file, format),
        Command::Health {
            address,
            path,
            timeout,
        } => match health(&address, &path, timeout) {
            Ok(200) => ExitCode::SUCCESS,
            Ok(status) => {
                eprintln!("gatehouse health: {address}{path} answered {status}");
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("gatehouse health: {address}{path}: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Keygen { hmac_secret_env } => {
            let mut random = [0u8; 32];
            if let Err(error) = getrandom::fill(&mut random) {
                eprintln!("gatehouse keygen: no randomness available: {error}");
                return ExitCode::FAILURE;
            }
            use base64::Engine;
            let key = format!(
                "gh_{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
            );
            let hash = match hmac_secret_env {
                None => format!(
                    "sha256:{}",
                    hex::encode(gatehouse_filters::consumers::sha256(key.as_bytes()))
                ),
                Some(name) => match std::env::var(&name) {
                    Ok(secret) if !secret.is_empty() => format!(
                        "hmac-sha256:{}",
                        hex::encode(gatehouse_filters::consumers::hmac_sha256(
                            secret.as_bytes(),
                            key.as_bytes()
                        ))
                    ),
                    _ => {
                        eprintln!("gatehouse keygen: environment variable {name} is not set");
                        return ExitCode::FAILURE;
                    }
                },
            };
            println!("key:  {key}");
            println!("hash: {hash}");
            eprintln!("Give the key to its owner now: it is not stored and cannot be shown again.");
            eprintln!("Add the hash to the consumer:  - {{ type: api_key, hash: \"{hash}\" }}");
            ExitCode::SUCCESS
        }
        Command::Migrate { database } => database_command("migrate", || {
            let database = database.database()?;
            let applied = block_on(database.migrate())?;
            Ok(if applied.is_empty() {
                format!("{}: the schema is up to date\n", database.display)
            } else {
                format!("{}: applied {}\n", database.display, applied.join(", "))
            })
        }),
        Command::Config {
            action:
                ConfigAction::Push {
                    file,
                    database,
                    author,
                    comment,
                },
        } => database_command("config push", || {
            let database = database.database()?;
            // The file must compile as it is, exactly as a node would build it.
            gatehouse::config::load::load_file(&file)
                .and_then(|loaded| {
                    gatehouse::config::compile(
                        loaded,
                        &file.display().to_string(),
                        0,
                        &Default::default(),
                    )
                })
                .map_err(|errors| {
                    anyhow::anyhow!("{} is not valid, nothing stored:\n{errors}", file.display())
                })?;
            // What is stored is the document as written: secret references, not their values.
            let written = gatehouse::config::load::read_yaml(&file)?;
            let local: Vec<&str> = gatehouse::config::source::postgres::LOCAL_SECTIONS
                .iter()
                .copied()
                .filter(|section| written.get(*section).is_some())
                .collect();
            if !local.is_empty() {
                eprintln!(
                    "note: {} are stored too, but each node takes them from its own file",
                    local.join(", ")
                );
            }
            let document = serde_json::to_value(written)?;
            let author = author
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "gatehouse".into());
            let version = block_on(database.push(&document, &author, &comment))?;
            Ok(format!(
                "{}: stored as version {version} in {}\n",
                file.display(),
                database.display
            ))
        }),
        Command::Config {
            action: ConfigAction::Pull { database },
        } => database_command("config pull", || {
            let database = database.database()?;
            let loaded = block_on(database.pull())?;
            if loaded.version.is_none() {
                anyhow::bail!("{} holds no config yet", database.display);
            }
            Ok(serde_yaml::to_string(&loaded.document)?)
        }),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&gatehouse::config_schema(
                    &gatehouse::filter_registry()
                ))
                .expect("schema serialises")
            );
            ExitCode::SUCCESS
        }
        Command::Explain {
            config,
            method,
            host,
            headers,
            path,
        } => {
            let snapshot = match gatehouse::config::load::load_file(&config).and_then(|loaded| {
                gatehouse::config::compile(
                    loaded,
                    &config.display().to_string(),
                    0,
                    &Default::default(),
                )
            }) {
                Ok(snapshot) => snapshot,
                Err(errors) => {
                    eprint!("{}: {errors}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            let mut query = format!("method={method}&path={}", encode(&path));
            if let Some(host) = host {
                query.push_str(&format!("&host={}", encode(&host)));
            }
            for header in headers {
                query.push_str(&format!("&header={}", encode(&header)));
            }
            match gatehouse::ops::explain::Query::parse(&query) {
                Ok(query) => {
                    let explained = gatehouse::ops::explain::explain(&snapshot, &query);
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&explained).expect("serialises")
                    );
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("gatehouse explain: {message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `gatehouse validate`: compile the document at `file` (`-`: standard input) as a reload would.
fn validate(file: &std::path::Path, format: OutputFormat) -> ExitCode {
    let from_stdin = file.as_os_str() == "-";
    let label = if from_stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let loaded = if from_stdin {
        let mut text = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            Ok(_) => gatehouse::config::load::parse_yaml(&text),
            Err(error) => Err(gatehouse::config::ConfigErrors(vec![
                gatehouse::config::ConfigError::new("", format!("cannot read stdin: {error}")),
            ])),
        }
    } else {
        gatehouse::config::load::load_file(file)
    };
    let compiled = loaded
        .and_then(|loaded| gatehouse::config::compile(loaded, &label, 0, &Default::default()));
    match (compiled, format) {
        (Ok(snapshot), OutputFormat::Text) => {
            println!(
                "{label}: ok ({} routes, {} upstreams, hash {})",
                snapshot.routes.len(),
                snapshot.upstreams.len(),
                &snapshot.hash[..12]
            );
            ExitCode::SUCCESS
        }
        (Err(errors), OutputFormat::Text) => {
            eprint!("{label}: {errors}");
            ExitCode::FAILURE
        }
        (Ok(snapshot), OutputFormat::Json) => {
            println!(
                "{}",
                serde_json::json!({
                    "ok": true,
                    "routes": snapshot.routes.len(),
                    "upstreams": snapshot.upstreams.len(),
                    "hash": snapshot.hash,
                })
            );
            ExitCode::SUCCESS
        }
        (Err(errors), OutputFormat::Json) => {
            let errors: Vec<_> = errors
                .0
                .iter()
                .map(|error| serde_json::json!({ "path": error.path, "message": error.message }))
                .collect();
            println!("{}", serde_json::json!({ "ok": false, "errors": errors }));
            ExitCode::FAILURE
        }
    }
}

fn encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

/// One `GET` on the ops listener; the answer's status code.
fn health(address: &str, path: &str, timeout: std::time::Duration) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let deadline = std::time::Instant::now() + timeout;
    let target = address.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to connect to")
    })?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(std::time::Duration::from_millis(1))
    };
    stream.set_write_timeout(Some(left()))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 512];
    while !head.windows(2).any(|pair| pair == b"\r\n") {
        stream.set_read_timeout(Some(left()))?;
        let read = stream.read(&mut buffer)?;
        if read == 0 || head.len() > 4096 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}
