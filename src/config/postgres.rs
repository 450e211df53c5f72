//! The PostgreSQL config source: schema migrations, reading the whole config in one REPEATABLE
//! READ transaction, recording each version's outcome, `config push` / `config pull`, and the
//! background service that keeps a node in sync (LISTEN `gatehouse_config`, a debounce, and a
//! periodic full resync that catches missed notifications).
//!
//! The database document goes through the same load and compile steps as a YAML file. The node's
//! own file keeps the sections only it can decide (`server`, `ops`, `config`, `telemetry`); they
//! replace whatever the database holds for them.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, IsolationLevel};

use super::model::{PostgresSourceConfig, PostgresTlsMode};
use super::store::ConfigStore;

/// The schema migrations, in order. `gatehouse migrate` applies the ones not yet recorded in
/// `schema_migrations`; the admin service reads the same files.
pub const MIGRATIONS: &[(&str, &str)] = &[(
    "0001_config_store",
    include_str!("../../sql/migrations/0001_config_store.sql"),
)];

const LOAD_CONFIG: &str = include_str!("../../sql/queries/load_config.sql");
const MARK_APPLIED: &str = include_str!("../../sql/queries/mark_applied.sql");
const MARK_REJECTED: &str = include_str!("../../sql/queries/mark_rejected.sql");

/// Sections a node takes from its own file, never from the database.
pub const LOCAL_SECTIONS: &[&str] = &["server", "ops", "config", "telemetry"];

/// The channel PostgreSQL notifies on every committed config change.
pub const CHANNEL: &str = "gatehouse_config";

/// Checks a database URL as the compile step sees it.
pub fn check_url(url: &str) -> Result<(), String> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|error| format!("not a PostgreSQL URL: {error}"))?;
    if url.contains("sslmode=") {
        return Err(
            "set TLS with `config.postgres.tls.mode` (disable | require), not `sslmode` in the URL"
                .into(),
        );
    }
    Ok(())
}

use gatehouse_filters::util::now_millis as now_ms;

/// How to reach the database.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    schema: Option<String>,
    /// Deadline of connecting and of each query.
    pub timeout: Duration,
    /// `host:port/database`, for logs and `/config` (never the password).
    pub display: String,
}

/// What the connection reports besides query results.
#[derive(Debug)]
enum Event {
    Notified(String),
    Lost(String),
}

/// One version of the config as the database holds it.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// `None` while nothing was ever written.
    pub version: Option<i64>,
    /// When that version was committed, in Unix milliseconds.
    pub created_ms: Option<u64>,
    pub document: serde_json::Value,
    pub digest: String,
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Database {
    pub fn new(
        url: &str,
        schema: Option<&str>,
        tls_mode: PostgresTlsMode,
        ca_file: Option<&str>,
        timeout: Duration,
    ) -> Result<Database, String> {
        check_url(url)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|error| format!("not a PostgreSQL URL: {error}"))?;
        config.connect_timeout(timeout);
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.application_name("gatehouse");
        let host = config
            .get_hosts()
            .first()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let display = format!("{host}:{port}/{}", config.get_dbname().unwrap_or_default());
        let tls = match tls_mode {
            PostgresTlsMode::Disable => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            PostgresTlsMode::Require => {
                // Require: the connection fails rather than fall back to plaintext.
                config.ssl_mode(SslMode::Require);
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                    tls_client_config(ca_file)?,
                ))
            }
        };
        Ok(Database {
            config,
            tls,
            schema: schema.map(str::to_string),
            timeout,
            display,
        })
    }

    pub fn from_settings(settings: &PostgresSourceConfig) -> Result<Database, String> {
        Database::new(
            &settings.url,
            settings.schema.as_deref(),
            settings.tls.mode,
            settings.tls.ca_file.as_deref(),
            settings.connect_timeout.get(),
        )
    }

    /// A connection whose notifications (after `LISTEN`) and loss arrive on the receiver.
    async fn connect(&self) -> Result<(Client, mpsc::UnboundedReceiver<Event>), String> {
        let (sender, events) = mpsc::unbounded_channel();
        let client = match &self.tls {
            None => {
                let (client, connection) =
                    tokio::time::timeout(self.timeout, self.config.connect(tokio_postgres::NoTls))
                        .await
                        .map_err(|_| format!("no connection within {:?}", self.timeout))?
                        .map_err(|error| describe(&error))?;
                drive(connection, sender);
                client
            }
            Some(tls) => {
                let (client, connection) =
                    tokio::time::timeout(self.timeout, self.config.connect(tls.clone()))
                        .await
                        .map_err(|_| format!("no connection within {:?}", self.timeout))?
                        .map_err(|error| describe(&error))?;
                drive(connection, sender);
                client
            }
        };
        if let Some(schema) = &self.schema {
            self.within_timeout(
                client.batch_execute(&format!("SET search_path TO {}", quote_identifier(schema))),
            )
            .await?;
        }
        Ok((client, events))
    }

    async fn within_timeout<T>(
        &self,
        future: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.timeout, future)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|error| describe(&error))
    }

    /// Reads the whole config in one REPEATABLE READ, read-only transaction.
    async fn load(&self, client: &mut Client) -> Result<Loaded, String> {
        let query = format!(
            "SELECT version_id, (extract(epoch FROM version_created_at) * 1000)::float8, \
             config::text, config_digest FROM ({}) AS loaded",
            LOAD_CONFIG.trim().trim_end_matches(';')
        );
        let timeout = self.timeout;
        let work = async {
            let transaction = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let row = transaction.query_one(query.as_str(), &[]).await?;
            transaction.commit().await?;
            Ok::<_, tokio_postgres::Error>(row)
        };
        let row = tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|error| describe(&error))?;
        let text: String = row.get(2);
        Ok(Loaded {
            version: row.get(0),
            created_ms: row.get::<_, Option<f64>>(1).map(|ms| ms as u64),
            document: serde_json::from_str(&text)
                .map_err(|error| format!("the database sent an unreadable document: {error}"))?,
            digest: row.get(3),
        })
    }

    /// Records that this node applied `version`, or why it rejected it.
    async fn record(
        &self,
        client: &Client,
        version: i64,
        outcome: Result<(), &str>,
        node: &str,
    ) -> Result<(), String> {
        match outcome {
            Ok(()) => {
                self.within_timeout(client.execute(MARK_APPLIED, &[&version, &node]))
                    .await?
            }
            Err(error) => {
                self.within_timeout(client.execute(MARK_REJECTED, &[&version, &error, &node]))
                    .await?
            }
        };
        Ok(())
    }

    /// Applies the migrations not yet recorded, each in its own transaction. Returns their names.
    pub async fn migrate(&self) -> Result<Vec<String>, String> {
        let (mut client, _events) = self.connect().await?;
        // One migrating node at a time, from the very first statement; the others wait, then
        // find the work done.
        self.within_timeout(client.batch_execute("SELECT pg_advisory_lock(7315209)"))
            .await?;
        if let Some(schema) = &self.schema {
            let quoted = quote_identifier(schema);
            self.within_timeout(client.batch_execute(&format!(
                "SET client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {quoted}; SET search_path TO {quoted}"
            )))
            .await?;
        }
        self.within_timeout(client.batch_execute(
            "SET client_min_messages = warning; \
             CREATE TABLE IF NOT EXISTS schema_migrations ( \
               name text PRIMARY KEY, checksum text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())",
        ))
        .await?;
        let mut applied = Vec::new();
        for (name, sql) in MIGRATIONS {
            let checksum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(sql.as_bytes()));
            let transaction = client.transaction().await.map_err(|e| describe(&e))?;
            let recorded = transaction
                .query_opt(
                    "SELECT checksum FROM schema_migrations WHERE name = $1",
                    &[name],
                )
                .await
                .map_err(|e| describe(&e))?;
            match recorded {
                Some(row) => {
                    let recorded: String = row.get(0);
                    if recorded != checksum {
                        return Err(format!(
                            "migration {name} was applied with different contents (checksum {recorded}, this build has {checksum})"
                        ));
                    }
                }
                None => {
                    transaction
                        .batch_execute(sql)
                        .await
                        .map_err(|error| format!("migration {name}: {}", describe(&error)))?;
                    transaction
                        .execute(
                            "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                            &[name, &checksum],
                        )
                        .await
                        .map_err(|e| describe(&e))?;
                    applied.push(name.to_string());
                }
            }
            transaction.commit().await.map_err(|e| describe(&e))?;
        }
        Ok(applied)
    }

    /// Replaces the whole stored config with `document` as one new version; returns its id.
    pub async fn push(
        &self,
        document: &serde_json::Value,
        author: &str,
        comment: &str,
    ) -> Result<i64, String> {
        let (client, _events) = self.connect().await?;
        let text = document.to_string();
        let row = self
            .within_timeout(client.query_one(
                "SELECT gatehouse_replace_config($1::text::jsonb, $2, $3)",
                &[&text, &author, &comment],
            ))
            .await?;
        Ok(row.get(0))
    }

    /// The live database config.
    pub async fn pull(&self) -> Result<Loaded, String> {
        let (mut client, _events) = self.connect().await?;
        self.load(&mut client).await
    }

    /// Connects and reads the config once (a node's first load).
    pub async fn fetch(&self) -> Result<Loaded, String> {
        self.pull().await
    }
}

fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            if db.code() == &tokio_postgres::error::SqlState::UNDEFINED_TABLE
                || db.code() == &tokio_postgres::error::SqlState::UNDEFINED_FUNCTION
            {
                text.push_str(" (has `gatehouse migrate` run on this database, and is `config.postgres.schema` right?)");
            }
            text
        }
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

/// Polls the connection: forwards notifications, and reports when it ends.
fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    sender: mpsc::UnboundedSender<Event>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(notification)) => {
                    let _ = sender.send(Event::Notified(notification.payload().to_string()));
                }
                Ok(_) => {}
                Err(error) => {
                    let _ = sender.send(Event::Lost(describe(&error)));
                    return;
                }
            }
        }
        let _ = sender.send(Event::Lost("the server closed the connection".into()));
    });
}

fn tls_client_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|error| format!("ca_file {path}: {error}"))?;
            for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
                let certificate =
                    certificate.map_err(|error| format!("ca_file {path}: {error}"))?;
                roots
                    .add(certificate)
                    .map_err(|error| format!("ca_file {path}: {error}"))?;
            }
            if roots.is_empty() {
                return Err(format!("ca_file {path} holds no certificate"));
            }
        }
        None => {
            for certificate in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(certificate);
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}

/// Where a node's database sync stands, for `/config`, `/readyz` and `/metrics`.
#[derive(Default)]
pub struct SourceState {
    pub up: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Newest version seen in the database (from a load or a notification); -1: none.
    pub latest_version: AtomicI64,
    pub latest_created_ms: AtomicU64,
    /// Version this node serves; -1: none.
    pub applied_version: AtomicI64,
    pub applied_created_ms: AtomicU64,
    pub last_rejected_version: AtomicI64,
    /// The last full read, in Unix milliseconds.
    pub last_sync_ms: AtomicU64,
    pub booted_from_snapshot: AtomicBool,
}

impl SourceState {
    pub fn new() -> SourceState {
        let state = SourceState::default();
        state.latest_version.store(-1, Ordering::Relaxed);
        state.applied_version.store(-1, Ordering::Relaxed);
        state.last_rejected_version.store(-1, Ordering::Relaxed);
        state
    }

    fn down(&self, error: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error, "PostgreSQL lost; serving the last applied config");
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
    }

    fn saw(&self, version: i64, created_ms: Option<u64>) {
        let previous = self.latest_version.fetch_max(version, Ordering::Relaxed);
        // A notification carries no time (its load, right after, sets the commit time).
        if version > previous || (version == previous && created_ms.is_some()) {
            self.latest_created_ms
                .store(created_ms.unwrap_or_else(now_ms), Ordering::Relaxed);
        }
    }

    /// Versions in the database this node has not decided yet (a rejected one is decided: the
    /// node is in sync, serving the version before it).
    pub fn versions_behind(&self) -> i64 {
        let latest = self.latest_version.load(Ordering::Relaxed);
        let decided = self
            .applied_version
            .load(Ordering::Relaxed)
            .max(self.last_rejected_version.load(Ordering::Relaxed));
        (latest - decided).max(0)
    }

    /// What `/config` shows: versions, the lag behind the database and the connection state.
    pub fn report(&self) -> serde_json::Value {
        let latest = self.latest_version.load(Ordering::Relaxed);
        let applied = self.applied_version.load(Ordering::Relaxed);
        let behind = self.versions_behind();
        let lag_seconds = if behind > 0 {
            now_ms().saturating_sub(self.latest_created_ms.load(Ordering::Relaxed)) as f64 / 1000.0
        } else {
            0.0
        };
        let time = |ms: u64| {
            (ms != 0).then(|| {
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
            })
        };
        let state = if self.up.load(Ordering::Relaxed) {
            "up"
        } else {
            "down"
        };
        let rejected = self.last_rejected_version.load(Ordering::Relaxed);
        serde_json::json!({
            "state": state,
            "last_error": self.last_error.lock().ok().and_then(|error| error.clone()),
            "applied_version": (applied >= 0).then_some(applied),
            "applied_version_created_at": time(self.applied_created_ms.load(Ordering::Relaxed)),
            "latest_version": (latest >= 0).then_some(latest),
            "versions_behind": behind,
            "lag_seconds": lag_seconds,
            "last_rejected_version": (rejected >= 0).then_some(rejected),
            "last_sync": time(self.last_sync_ms.load(Ordering::Relaxed)),
            "booted_from_snapshot": self.booted_from_snapshot.load(Ordering::Relaxed),
        })
    }
}

/// This node's name in `config_versions.decided_by`.
pub fn node_name(settings: &PostgresSourceConfig) -> String {
    settings.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "gatehouse".into())
    })
}

/// Applies a loaded version to the store and, with `record`, writes the outcome to the
/// database. Returns whether the outcome was recorded.
async fn apply(
    store: &ConfigStore,
    database: &Database,
    client: &Client,
    loaded: &Loaded,
    node: &str,
    record: bool,
) -> bool {
    let Some(version) = loaded.version else {
        return false;
    };
    let outcome = store.apply_database(loaded);
    if !record {
        return false;
    }
    let text = outcome.as_ref().err().map(|errors| {
        errors
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    });
    match database
        .record(client, version, text.as_deref().map_or(Ok(()), Err), node)
        .await
    {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(version, %error, "could not record the version's outcome in config_versions");
            false
        }
    }
}

/// The background service of `source: postgres`.
pub struct PostgresSync {
    pub store: Arc<ConfigStore>,
}

#[async_trait]
impl BackgroundService for PostgresSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(source) = self.store.postgres() else {
            return;
        };
        let database = source.database.clone();
        let state = source.state.clone();
        let settings = source.settings.clone();
        let node = node_name(&settings);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut backoff = Duration::from_millis(100);
        let mut recorded: Option<i64> = None;
        let mut first_attempt = true;
        loop {
            if !first_attempt {
                // Every way back here waits: an error that repeats (a wrong schema, migrations
                // not run, no permission) must not turn into a tight reconnect loop.
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            first_attempt = false;
            let (mut client, mut events) = match database.connect().await {
                Ok(connection) => connection,
                Err(error) => {
                    state.down(&error);
                    continue;
                }
            };
            if let Err(error) = database
                .within_timeout(client.batch_execute(&format!("LISTEN {CHANNEL}")))
                .await
            {
                state.down(&error);
                continue;
            }
            let mut resync = tokio::time::interval(settings.resync_interval.get());
            resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate: a (re)connected node catches up at once.
            let lost = loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = resync.tick() => {}
                    _ = async { match hangup.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {
                        tracing::info!("SIGHUP: reading the config from PostgreSQL");
                    }
                    event = events.recv() => match event {
                        Some(Event::Notified(payload)) => {
                            if let Ok(version) = payload.trim().parse::<i64>() {
                                state.saw(version, None);
                            }
                            // Changes arriving together are read once.
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                _ = tokio::time::sleep(settings.debounce.get()) => {}
                            }
                            let mut lost = None;
                            while let Ok(event) = events.try_recv() {
                                if let Event::Lost(error) = event {
                                    lost = Some(error);
                                }
                            }
                            if let Some(error) = lost {
                                break error;
                            }
                        }
                        Some(Event::Lost(error)) => break error,
                        None => break "the connection ended".to_string(),
                    },
                }
                let loaded = tokio::select! {
                    _ = shutdown.changed() => return,
                    loaded = database.load(&mut client) => loaded,
                };
                match loaded {
                    Ok(loaded) => {
                        if !state.up.swap(true, Ordering::Relaxed) {
                            tracing::info!(database = %database.display, "PostgreSQL connected; listening for config changes");
                        }
                        if let Ok(mut last) = state.last_error.lock() {
                            *last = None;
                        }
                        backoff = Duration::from_millis(100);
                        state.last_sync_ms.store(now_ms(), Ordering::Relaxed);
                        if let Some(version) = loaded.version {
                            state.saw(version, loaded.created_ms);
                        }
                        // Each version's outcome is written once per node, not at every resync.
                        let fresh = loaded.version.is_some() && loaded.version != recorded;
                        if apply(&self.store, &database, &client, &loaded, &node, fresh).await {
                            recorded = loaded.version;
                        }
                    }
                    Err(error) => break error,
                }
            };
            state.down(&lost);
        }
    }
}
