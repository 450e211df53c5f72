//! Checks of the node's own sections: listeners, request limits, the ops listener, the config
//! source's settings and telemetry.

use std::collections::HashMap;

use super::super::error::ConfigError;
use super::super::model::{Config, SourceKind};
use super::super::snapshot::{Limits, ListenerPolicy, ProxyProtocolPolicy};

/// Pingora's own parser refuses more header fields than this (with 400), so a larger limit
/// could never apply.
const PINGORA_MAX_HEADERS: usize = 256;
const PINGORA_MAX_HEADER_BYTES: u64 = 1_048_575;

/// Listener names and addresses are unique and well formed, and TLS files are readable; the
/// policies each listener applies to its connections.
pub(super) fn check_listeners(
    config: &Config,
    errors: &mut Vec<ConfigError>,
) -> Vec<ListenerPolicy> {
    let mut policies = Vec::new();
    let server = &config.server;
    if server.listeners.is_empty() {
        errors.push(ConfigError::new(
            "server.listeners",
            "at least one listener is needed",
        ));
    }
    let mut listener_names = HashMap::new();
    let mut listener_addresses = HashMap::new();
    for (index, listener) in server.listeners.iter().enumerate() {
        let path = format!("server.listeners[{index}]");
        if let Some(previous) = listener_names.insert(listener.name.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!(
                    "duplicate listener name \"{}\" (also server.listeners[{previous}])",
                    listener.name
                ),
            ));
        }
        let address = listener.address.parse::<std::net::SocketAddr>();
        if address.is_err() {
            errors.push(ConfigError::new(
                format!("{path}.address"),
                format!("\"{}\" is not an IP:PORT address", listener.address),
            ));
        } else if let Some(previous) = listener_addresses.insert(listener.address.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.address"),
                format!("address already used by server.listeners[{previous}]"),
            ));
        }
        if let Some(tls) = &listener.tls {
            if let Err(message) = crate::edge::tls::check(tls) {
                errors.push(ConfigError::new(format!("{path}.tls"), message));
            }
            if listener.h2c {
                errors.push(ConfigError::new(
                    format!("{path}.h2c"),
                    "h2c is HTTP/2 over plaintext; a TLS listener offers HTTP/2 through ALPN",
                ));
            }
        }
        let proxy_protocol = listener.proxy_protocol.as_ref().map(|proxy| {
            if proxy.trusted.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.proxy_protocol.trusted"),
                    "name the load balancers allowed to send PROXY headers (addresses or CIDRs); \
                     with none, every connection would be refused",
                ));
            }
            if proxy.timeout.get().is_zero() {
                errors.push(ConfigError::new(
                    format!("{path}.proxy_protocol.timeout"),
                    "must be longer than zero",
                ));
            }
            ProxyProtocolPolicy {
                trusted: proxy.trusted.clone(),
                timeout: proxy.timeout.get(),
            }
        });
        if let Ok(address) = address {
            policies.push(ListenerPolicy {
                name: listener.name.as_str().into(),
                address,
                proxy_protocol,
                h2c: listener.h2c,
            });
        }
    }
    if server.threads == Some(0) {
        errors.push(ConfigError::new("server.threads", "must be at least 1"));
    }
    let http2 = &server.http2;
    if http2.max_concurrent_streams == 0 {
        errors.push(ConfigError::new(
            "server.http2.max_concurrent_streams",
            "must be at least 1",
        ));
    }
    if http2.max_header_list_size.0 == 0 || http2.max_header_list_size.0 > u64::from(u32::MAX) {
        errors.push(ConfigError::new(
            "server.http2.max_header_list_size",
            "must be between 1 byte and 4 GiB",
        ));
    }
    if http2.idle_timeout.get().is_zero() {
        errors.push(ConfigError::new(
            "server.http2.idle_timeout",
            "must be longer than zero",
        ));
    }
    if server.max_requests_per_connection == Some(0) {
        errors.push(ConfigError::new(
            "server.max_requests_per_connection",
            "must be at least 1 (leave it out for no limit)",
        ));
    }
    policies
}

/// The request limits, checked against what Pingora can enforce.
pub(super) fn limits(config: &Config, errors: &mut Vec<ConfigError>) -> Limits {
    let limits = &config.server.limits;
    if limits.max_headers == 0 || limits.max_headers > PINGORA_MAX_HEADERS {
        errors.push(ConfigError::new(
            "server.limits.max_headers",
            format!("must be between 1 and {PINGORA_MAX_HEADERS}"),
        ));
    }
    if limits.max_header_bytes.0 == 0 || limits.max_header_bytes.0 > PINGORA_MAX_HEADER_BYTES {
        errors.push(ConfigError::new(
            "server.limits.max_header_bytes",
            format!("must be between 1 and {PINGORA_MAX_HEADER_BYTES} bytes"),
        ));
    }
    if limits.max_uri_bytes.0 == 0 {
        errors.push(ConfigError::new(
            "server.limits.max_uri_bytes",
            "must be at least 1",
        ));
    }
    if limits.header_read_timeout.get().is_zero() {
        errors.push(ConfigError::new(
            "server.limits.header_read_timeout",
            "must be longer than zero",
        ));
    }
    Limits {
        max_header_bytes: limits.max_header_bytes.0 as usize,
        max_headers: limits.max_headers,
        max_uri_bytes: limits.max_uri_bytes.0 as usize,
        max_body_bytes: limits.max_body_bytes.0,
        header_read_timeout: limits.header_read_timeout.get(),
    }
}

/// The ops listener, the config source's settings and telemetry.
pub(super) fn check_node(config: &Config, errors: &mut Vec<ConfigError>) {
    if config
        .ops
        .listener_address()
        .is_some_and(|address| address.parse::<std::net::SocketAddr>().is_err())
    {
        errors.push(ConfigError::new(
            "ops.address",
            format!(
                "\"{}\" is not an IP:PORT address (or \"off\")",
                config.ops.address
            ),
        ));
    }
    match (&config.config.source, &config.config.postgres) {
        (SourceKind::Postgres, None) => errors.push(ConfigError::new(
            "config.postgres",
            "`source: postgres` needs a `postgres` section with the database `url`",
        )),
        (SourceKind::Postgres, Some(postgres)) => {
            if let Err(message) = crate::config::source::postgres::check_url(&postgres.url) {
                errors.push(ConfigError::new("config.postgres.url", message.to_string()));
            }
            for (key, value) in [
                ("resync_interval", postgres.resync_interval),
                ("connect_timeout", postgres.connect_timeout),
            ] {
                if value.get().is_zero() {
                    errors.push(ConfigError::new(
                        format!("config.postgres.{key}"),
                        "must be more than 0s",
                    ));
                }
            }
        }
        (SourceKind::File, _) => {}
    }
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(&config.telemetry.log.level) {
        errors.push(ConfigError::new(
            "telemetry.log.level",
            format!("not a level (error, warn, info, debug, trace) or a filter like \"info,gatehouse=debug\": {error}"),
        ));
    }
    if let Some(tracing) = &config.telemetry.tracing {
        let path = "telemetry.tracing";
        let (key, url) = match (&tracing.endpoint, &tracing.otlp_endpoint) {
            (Some(endpoint), None) => ("endpoint", Some(endpoint)),
            (None, Some(base)) => ("otlp_endpoint", Some(base)),
            _ => ("endpoint", None),
        };
        match url.map(|url| url.parse::<http::Uri>()) {
            None => errors.push(ConfigError::new(
                format!("{path}.endpoint"),
                "give either `endpoint` (the traces URL, e.g. http://127.0.0.1:4318/v1/traces) or `otlp_endpoint` (the collector's base URL, e.g. http://127.0.0.1:4318), not both",
            )),
            Some(Ok(uri)) if uri.scheme_str() == Some("http") && uri.authority().is_some() => {}
            Some(Ok(uri)) if uri.scheme_str() == Some("https") => errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "the exporter speaks plain HTTP only: send to an OpenTelemetry Collector on the node or its network (http://127.0.0.1:4318), which forwards over TLS",
            )),
            Some(_) => errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "an http:// URL, e.g. http://127.0.0.1:4318/v1/traces",
            )),
        }
        if !(0.0..=1.0).contains(&tracing.sample_ratio) {
            errors.push(ConfigError::new(
                format!("{path}.sample_ratio"),
                "must be between 0.0 and 1.0",
            ));
        }
        if tracing.max_queue == 0 || tracing.max_batch == 0 || tracing.max_batch > tracing.max_queue
        {
            errors.push(ConfigError::new(
                format!("{path}.max_batch"),
                "max_queue and max_batch must be at least 1, and max_batch at most max_queue",
            ));
        }
        if tracing.export_timeout.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{path}.export_timeout"),
                "must be more than 0s",
            ));
        }
    }
    let sample = config.telemetry.access_log.sample;
    if !(0.0..=1.0).contains(&sample) {
        errors.push(ConfigError::new(
            "telemetry.access_log.sample",
            "must be between 0.0 and 1.0",
        ));
    }
}

/// The header the request id travels in: the one the global chain's `request_id` filter names,
/// or `x-request-id`. The gateway's own answers before any filter ran carry the id there.
pub(super) fn request_id_header(config: &Config) -> http::HeaderName {
    config
        .filters
        .iter()
        .filter(|filter| filter.kind == "request_id")
        .find_map(|filter| {
            let settings: gatehouse_filters::request_id::Config = if filter.config.is_null() {
                Default::default()
            } else {
                serde_json::from_value(filter.config.clone()).ok()?
            };
            http::HeaderName::from_bytes(settings.header.as_bytes()).ok()
        })
        .unwrap_or(http::HeaderName::from_static("x-request-id"))
}
