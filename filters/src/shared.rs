//! Clients shared by filters and config versions: a small I/O runtime for background work
//! (key-set fetches, Redis connections) and one Redis client per URL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use once_cell::sync::Lazy;

/// Background I/O that must not depend on which runtime a request runs on.
pub static IO: Lazy<tokio::runtime::Runtime> = Lazy::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gatehouse-io")
        .enable_all()
        .build()
        .expect("start the I/O runtime")
});

/// How Gatehouse talks to Redis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RedisSettings {
    pub url: String,
    /// Every command's deadline; a command past it fails, and the caller's failure policy applies.
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
}

static CLIENTS: Lazy<Mutex<HashMap<RedisSettings, Arc<Client>>>> = Lazy::new(Default::default);

/// The client for these settings, created and connected (in the background) on first use.
/// Reconnects with exponential backoff; commands queued while disconnected fail at their deadline.
pub fn redis_client(settings: &RedisSettings) -> Result<Arc<Client>, String> {
    let mut clients = CLIENTS.lock().expect("Redis client registry lock");
    if let Some(client) = clients.get(settings) {
        return Ok(client.clone());
    }
    let config =
        Config::from_url(&settings.url).map_err(|error| format!("invalid Redis URL: {error}"))?;
    let command_timeout = settings.command_timeout;
    let connect_timeout = settings.connect_timeout;
    let client = Builder::from_config(config)
        .with_performance_config(|performance| {
            performance.default_command_timeout = command_timeout;
        })
        .with_connection_config(|connection| {
            connection.connection_timeout = connect_timeout;
            connection.internal_command_timeout = connect_timeout;
            connection.max_command_attempts = 1;
            // A bounded queue: while Redis is away, commands fail instead of piling up.
            connection.max_command_buffer_len = 10_000;
            connection.tcp = TcpConfig {
                nodelay: Some(true),
                ..Default::default()
            };
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build()
        .map_err(|error| format!("cannot create the Redis client: {error}"))?;
    {
        let _runtime = IO.enter();
        let _connection = client.connect();
    }
    let client = Arc::new(client);
    clients.insert(settings.clone(), client.clone());
    Ok(client)
}
