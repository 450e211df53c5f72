//! The PostgreSQL client of the config store: connecting (with TLS when asked), reading the
//! whole config in one REPEATABLE READ transaction, recording each version's outcome, and
//! `config push` / `config pull`. Every call has a deadline; every failure is a
//! [`DatabaseError`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, IsolationLevel};

use crate::config::model::{PostgresSourceConfig, PostgresTlsMode};

/// Why a database call failed. The text is what operators see in logs, `/config` and the CLI.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("not a PostgreSQL URL: {0}")]
    Url(String),
    #[error(
        "set TLS with `config.postgres.tls.mode` (disable | require), not `sslmode` in the URL"
    )]
    SslModeInUrl,
    #[error("{0}")]
    Tls(String),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no answer within {0:?}")]
    QueryTimeout(Duration),
    /// What PostgreSQL (or the connection) said, with its detail and hint.
    #[error("{0}")]
    Postgres(String),
    #[error("the database sent an unreadable document: {0}")]
    Document(String),
    #[error("migration {name}: {reason}")]
    Migration { name: String, reason: String },
    #[error("migration {name} was applied with different contents (checksum {recorded}, this build has {built})")]
    ChangedMigration {
        name: String,
        recorded: String,
        built: String,
    },
}

impl From<tokio_postgres::Error> for DatabaseError {
    fn from(error: tokio_postgres::Error) -> Self {
        DatabaseError::Postgres(describe(&error))
    }
}

const LOAD_CONFIG: &str = include_str!("../../../../sql/queries/load_config.sql");
const MARK_APPLIED: &str = include_str!("../../../../sql/queries/mark_applied.sql");
const MARK_REJECTED: &str = include_str!("../../../../sql/queries/mark_rejected.sql");

/// Checks a database URL as the compile step sees it.
pub fn check_url(url: &str) -> Result<(), DatabaseError> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|error| DatabaseError::Url(error.to_string()))?;
    if url.contains("sslmode=") {
        return Err(DatabaseError::SslModeInUrl);
    }
    Ok(())
}

/// How to reach the database.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pub(super) schema: Option<String>,
    /// Deadline of connecting and of each query.
    pub timeout: Duration,
    /// `host:port/database`, for logs and `/config` (never the password).
    pub display: String,
}

/// What the connection reports besides query results.
#[derive(Debug)]
pub(super) enum Event {
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

pub(super) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Database {
    pub fn new(
        url: &str,
        schema: Option<&str>,
        tls_mode: PostgresTlsMode,
        ca_file: Option<&str>,
        timeout: Duration,
    ) -> Result<Database, DatabaseError> {
        check_url(url)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|error: tokio_postgres::Error| DatabaseError::Url(error.to_string()))?;
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

    pub fn from_settings(settings: &PostgresSourceConfig) -> Result<Database, DatabaseError> {
        Database::new(
            &settings.url,
            settings.schema.as_deref(),
            settings.tls.mode,
            settings.tls.ca_file.as_deref(),
            settings.connect_timeout.get(),
        )
    }

    /// A connection whose notifications (after `LISTEN`) and loss arrive on the receiver.
    pub(super) async fn connect(
        &self,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Event>), DatabaseError> {
        let (sender, events) = mpsc::unbounded_channel();
        let client = match &self.tls {
            None => {
                let (client, connection) =
                    tokio::time::timeout(self.timeout, self.config.connect(tokio_postgres::NoTls))
                        .await
                        .map_err(|_| DatabaseError::ConnectTimeout(self.timeout))??;
                drive(connection, sender);
                client
            }
            Some(tls) => {
                let (client, connection) =
                    tokio::time::timeout(self.timeout, self.config.connect(tls.clone()))
                        .await
                        .map_err(|_| DatabaseError::ConnectTimeout(self.timeout))??;
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

    pub(super) async fn within_timeout<T>(
        &self,
        future: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DatabaseError> {
        tokio::time::timeout(self.timeout, future)
            .await
            .map_err(|_| DatabaseError::QueryTimeout(self.timeout))?
            .map_err(DatabaseError::from)
    }

    /// Reads the whole config in one REPEATABLE READ, read-only transaction.
    pub(super) async fn load(&self, client: &mut Client) -> Result<Loaded, DatabaseError> {
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
            .map_err(|_| DatabaseError::QueryTimeout(timeout))??;
        let text: String = row.get(2);
        Ok(Loaded {
            version: row.get(0),
            created_ms: row.get::<_, Option<f64>>(1).map(|ms| ms as u64),
            document: serde_json::from_str(&text)
                .map_err(|error| DatabaseError::Document(error.to_string()))?,
            digest: row.get(3),
        })
    }

    /// Records that this node applied `version`, or why it rejected it, in `config_versions`
    /// and in the node's own `config_nodes` row, with the address of its operations listener
    /// (`None` when it has none).
    pub(super) async fn record(
        &self,
        client: &Client,
        version: i64,
        outcome: Result<(), &str>,
        node: &str,
        ops_address: Option<&str>,
    ) -> Result<(), DatabaseError> {
        match outcome {
            Ok(()) => {
                self.within_timeout(client.execute(MARK_APPLIED, &[&version, &node, &ops_address]))
                    .await?
            }
            Err(error) => {
                self.within_timeout(
                    client.execute(MARK_REJECTED, &[&version, &error, &node, &ops_address]),
                )
                .await?
            }
        };
        Ok(())
    }

    /// Stores `document` as one new version, replacing the stored config. Returns its id.
    pub async fn push(
        &self,
        document: &serde_json::Value,
        author: &str,
        comment: &str,
    ) -> Result<i64, DatabaseError> {
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
    pub async fn pull(&self) -> Result<Loaded, DatabaseError> {
        let (mut client, _events) = self.connect().await?;
        self.load(&mut client).await
    }

    /// Connects and reads the config once (a node's first load).
    pub async fn fetch(&self) -> Result<Loaded, DatabaseError> {
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

fn tls_client_config(ca_file: Option<&str>) -> Result<rustls::ClientConfig, DatabaseError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let unreadable = |error: &dyn std::fmt::Display| {
                DatabaseError::Tls(format!("ca_file {path}: {error}"))
            };
            let pem = std::fs::read(path).map_err(|error| unreadable(&error))?;
            for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
                let certificate = certificate.map_err(|error| unreadable(&error))?;
                roots.add(certificate).map_err(|error| unreadable(&error))?;
            }
            if roots.is_empty() {
                return Err(DatabaseError::Tls(format!(
                    "ca_file {path} holds no certificate"
                )));
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
        .map_err(|error| DatabaseError::Tls(error.to_string()))
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}
