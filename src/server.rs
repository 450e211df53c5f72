//! Pingora server bootstrap: the proxy service with its listeners, the ops listener, and the
//! config reloader, all on one Pingora `Server` (graceful shutdown on SIGTERM, graceful upgrade
//! on SIGQUIT).

use std::path::Path;
use std::sync::Arc;

use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use crate::config::source;
use crate::config::{CompileEnv, ConfigErrors};
use crate::ops::OpsApp;
use crate::proxy::deadline::HeadDeadline;
use crate::proxy::Gateway;

/// How `gatehouse run` was asked to start.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take over the listening sockets of a running Gatehouse (graceful upgrade).
    pub upgrade: bool,
    /// Detach into the background.
    pub daemon: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("cannot start: {0}")]
    Server(String),
}

/// Start Gatehouse on `config_path` and serve until shut down. Returns only on a start failure.
pub fn run(config_path: &Path, options: RunOptions) -> Result<(), StartError> {
    // Logging first, from the file's own `telemetry` section, so that what happens while the
    // config is opened (a database that does not answer, a snapshot file served) is logged.
    let local = crate::config::load::load_file(config_path)?;
    crate::telemetry::logging::init(&local.resolved.telemetry.log);
    // One registry of filter kinds and one of metrics for the whole process: every config
    // version is built with them, whatever its source.
    let env = CompileEnv::default();
    let metrics = env.metrics.clone();
    let (store, config_source) = source::open(config_path, env)?;
    let snapshot = store.load();
    let config = &snapshot.config;
    crate::telemetry::access_log::init(
        &config.telemetry.access_log.path,
        config.telemetry.access_log.sample,
        &metrics,
    )
    .map_err(|error| {
        StartError::Server(format!(
            "access log {}: {error}",
            config.telemetry.access_log.path
        ))
    })?;
    crate::telemetry::traces::init(config.telemetry.tracing.as_ref(), &metrics);

    let server_config = &config.server;
    // A listener address another process holds: Pingora would retry the bind for 30 s while the
    // ops listener already answered ready, so a balancer would send traffic to a node that
    // cannot take it. Say so and stop instead. (An upgrade inherits the sockets: no check.)
    if !options.upgrade {
        for listener in &server_config.listeners {
            if let Err(error) = std::net::TcpListener::bind(listener.address.as_str()) {
                if error.kind() == std::io::ErrorKind::AddrInUse {
                    return Err(StartError::Server(format!(
                        "listener {} {}: the address is in use by another process",
                        listener.name, listener.address
                    )));
                }
            }
        }
    }
    let threads = server_config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    let mut conf = ServerConf {
        threads,
        grace_period_seconds: Some(server_config.grace_period.get().as_secs()),
        graceful_shutdown_timeout_seconds: Some(
            server_config.shutdown_timeout.get().as_secs().max(1),
        ),
        upgrade_sock: server_config.upgrade_socket.clone(),
        pid_file: server_config.pid_file.clone(),
        upstream_keepalive_pool_size: server_config.upstream_keepalive_pool_size,
        daemon: options.daemon,
        ..ServerConf::default()
    };
    conf.work_stealing = server_config.work_stealing;
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // The proxy, wrapped so slow request heads are cut off. Listeners with h2c get a second
    // one that takes HTTP/2 with prior knowledge; the wrapper tells which a connection needs.
    let request_metrics = crate::telemetry::metrics::RequestMetrics::new(&metrics);
    let build_proxy = |h2c: bool| {
        let gateway = Gateway::new(
            store.clone(),
            request_metrics.clone(),
            Some(
                pingora_core::connectors::ConnectorOptions::from_server_conf(&server.configuration),
            ),
        );
        let mut proxy = pingora_proxy::HttpProxy::new(gateway, server.configuration.clone());
        proxy.handle_init_modules();
        let mut server_options = HttpServerOptions::default();
        server_options.h2c = h2c;
        server_options.keepalive_request_limit = server_config.max_requests_per_connection;
        server_options.h2_idle_timeout = Some(server_config.http2.idle_timeout.get());
        proxy.server_options = Some(server_options);
        proxy.h2_options = Some(h2_options(&server_config.http2));
        Arc::new(proxy)
    };
    let inner = build_proxy(false);
    let inner_h2c = server_config
        .listeners
        .iter()
        .any(|listener| listener.h2c)
        .then(|| build_proxy(true));
    // PROXY protocol headers: read by the connection wrapper on plaintext listeners, and
    // before the handshake on TLS ones.
    let edge = crate::edge::Edge::new(store.clone(), &metrics);
    let app = HeadDeadline {
        inner,
        inner_h2c,
        store: store.clone(),
        edge: edge.clone(),
    };
    let mut proxy_service = Service::new("gatehouse proxy".to_string(), app);
    proxy_service.endpoints().set_pre_tls_callback(edge);
    let mut reloadable = Vec::new();
    for listener in &server_config.listeners {
        match &listener.tls {
            None => proxy_service.add_tcp(&listener.address),
            Some(tls) => {
                let built = crate::edge::tls::listener(listener, tls).map_err(|error| {
                    StartError::Server(format!("listener {}: TLS: {error}", listener.name))
                })?;
                reloadable.push(built.reloader);
                proxy_service.add_tls_with_settings(&listener.address, None, built.settings);
            }
        }
    }
    let tls_watcher = crate::edge::tls::Watcher::new(reloadable, &metrics);
    server.add_service(proxy_service);

    if let Some(address) = config.ops.listener_address() {
        let mut ops = Service::new(
            "gatehouse ops".to_string(),
            pingora_core::apps::http_app::HttpServer::new_app(OpsApp {
                store: store.clone(),
                source: config_source.clone(),
                metrics: metrics.clone(),
                started: std::sync::atomic::AtomicBool::new(false),
            }),
        );
        ops.threads = Some(1);
        ops.add_tcp(address);
        server.add_service(ops);
    }

    server.add_service(background_service("TLS certificate files", tls_watcher));
    server.add_service(background_service(
        "WebSocket drain",
        crate::proxy::websocket::DrainWatch {
            grace_period: std::time::Duration::from_secs(
                server_config.grace_period.get().as_secs(),
            ),
        },
    ));
    server.add_service(background_service(
        "config source",
        source::Service(config_source),
    ));
    server.add_service(background_service(
        "upstream health checks",
        crate::upstream::health::HealthSupervisor {
            store: store.clone(),
            registry: store.upstreams().clone(),
        },
    ));
    server.add_service(background_service(
        "upstream discovery",
        crate::upstream::discovery::Discovery {
            store: store.clone(),
            registry: store.upstreams().clone(),
        },
    ));

    tracing::info!(
        version = snapshot.version,
        hash = %snapshot.hash,
        listeners = %server_config.listeners.iter().map(|listener| listener.address.as_str()).collect::<Vec<_>>().join(","),
        ops = %config.ops.address,
        threads,
        "gatehouse starting"
    );
    drop(snapshot);
    server.run(pingora_core::server::RunArgs::default());
    // The spans still queued and the access log lines still buffered go out before the
    // process ends.
    crate::telemetry::traces::shutdown(std::time::Duration::from_secs(5));
    crate::telemetry::access_log::flush(std::time::Duration::from_secs(2));
    std::process::exit(0)
}

/// The HTTP/2 settings toward clients, every limit set explicitly.
fn h2_options(
    config: &crate::config::model::Http2Config,
) -> pingora_core::protocols::http::v2::server::H2Options {
    let mut options = pingora_core::protocols::http::v2::server::default_h2_options();
    options
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(u32::try_from(config.max_header_list_size.0).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(config.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(config.max_local_error_reset_streams));
    options
}
