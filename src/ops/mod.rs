//! The operations listener: `/healthz`, `/readyz`, `/metrics`, `/config` and `/explain`, on its
//! own address (loopback by default), separate from client traffic.

pub mod explain;

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::config::source::Source;
use crate::config::ConfigStore;

pub struct OpsApp {
    pub store: Arc<ConfigStore>,
    pub source: Arc<dyn Source>,
    /// The process's metrics registry, rendered at `/metrics`.
    pub metrics: gatehouse_filters::Metrics,
    /// Set once the node has been ready: from then on Redis never makes it unready (a reload
    /// that names another Redis serves in each policy's failure mode until it connects).
    pub started: std::sync::atomic::AtomicBool,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("valid response")
}

fn json(status: u16, value: serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&value).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

/// Replace secret values with a mask. References like `${env:NAME}` are not secrets and stay.
pub fn mask_secrets(value: &mut serde_json::Value) {
    const SECRET_KEYS: &[&str] = &[
        "secret",
        "password",
        "token",
        "client_secret",
        "api_key",
        "hash",
        "private_key",
        "secret_key",
    ];
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let secret = SECRET_KEYS
                    .iter()
                    .any(|name| key.eq_ignore_ascii_case(name));
                match item {
                    serde_json::Value::String(text)
                        if secret
                            && !(text.starts_with("${env:") || text.starts_with("${file:")) =>
                    {
                        *text = "******".into();
                    }
                    _ => mask_secrets(item),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_secrets),
        _ => {}
    }
}

#[async_trait]
impl ServeHttp for OpsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let request = session.req_header();
        let path = request.uri.path().to_string();
        let query = request.uri.query().unwrap_or("").to_string();
        let snapshot = self.store.load();
        match path.as_str() {
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let filters_ready = snapshot.filters_ready();
                let names_looked_up = snapshot.names_looked_up();
                // With a `redis` section, a starting node waits for its first connection (up
                // to `redis.ready_timeout`): requests decided before it would be decided by
                // each policy's failure mode, and a shared limit would admit more than it says.
                let redis_startup = snapshot
                    .redis
                    .as_ref()
                    .zip(snapshot.config.redis.as_ref())
                    .map(|(redis, config)| redis.startup(config.ready_timeout.get()));
                let started = self.started.load(std::sync::atomic::Ordering::Relaxed);
                let ready = filters_ready
                    && names_looked_up
                    && snapshot.serving
                    && (started || redis_startup != Some("waiting"));
                if ready && !started {
                    self.started
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                json(
                    if ready { 200 } else { 503 },
                    serde_json::json!({
                        "ready": ready,
                        "config_loaded": snapshot.serving,
                        "config": { "version": snapshot.version, "hash": snapshot.hash, "source": snapshot.source },
                        "filters_ready": filters_ready,
                        // Every upstream host name has had its first DNS answer (or failure).
                        "upstream_names_looked_up": names_looked_up,
                        // Once started, Redis being down does not make the node unready: each
                        // rate-limit policy has its failure mode, and the node keeps serving
                        // with it. `redis_startup`: connected, waiting, or fallback (ready
                        // without a connection, after `redis.ready_timeout`).
                        "redis": snapshot.redis.as_ref().map(|redis| redis.status()),
                        "redis_startup": redis_startup,
                    }),
                )
            }
            "/metrics" => reply(200, "text/plain; version=0.0.4", self.metrics.render()),
            "/config" => {
                let mut config = serde_json::to_value(&snapshot.config).unwrap_or_default();
                mask_secrets(&mut config);
                let mut report = serde_json::json!({
                    "version": snapshot.version,
                    "hash": snapshot.hash,
                    "source": snapshot.source,
                    "applied_at": humantime::format_rfc3339_seconds(snapshot.loaded_at).to_string(),
                });
                if let serde_json::Value::Object(fields) = &mut report {
                    fields.extend(self.source.report(&snapshot));
                    let now = crate::upstream::clock::now();
                    fields.insert(
                        "upstreams".into(),
                        snapshot
                            .upstreams
                            .iter()
                            .map(|pool| pool.report(now))
                            .collect(),
                    );
                    fields.insert("config".into(), config);
                }
                json(200, report)
            }
            "/explain" => match explain::Query::parse(&query) {
                Ok(query) => json(200, explain::explain(&snapshot, &query)),
                Err(message) => json(400, serde_json::json!({ "error": message })),
            },
            _ => json(
                404,
                serde_json::json!({ "error": "not found", "endpoints": ["/healthz", "/readyz", "/metrics", "/config", "/explain"] }),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mask_secrets;

    #[test]
    fn secret_values_are_masked_but_references_are_shown() {
        let mut config = serde_json::json!({
            "filters": [
                { "kind": "jwt", "config": { "keys": [{ "secret": "hunter2" }, { "secret": "${env:JWT_SECRET}" }] } },
                { "kind": "api_key", "config": { "hash": "sha256:abc", "header": "x-api-key" } },
            ],
            "redis": { "password": "pw", "url": "redis://127.0.0.1" },
        });
        mask_secrets(&mut config);
        let text = config.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("sha256:abc") && !text.contains("\"pw\"")
        );
        assert!(text.contains("${env:JWT_SECRET}"));
        assert_eq!(config["filters"][1]["config"]["header"], "x-api-key");
        assert_eq!(config["redis"]["url"], "redis://127.0.0.1");
    }
}
