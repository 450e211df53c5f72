//! JWKS key sets fetched over HTTP: fetched in the background (on the shared I/O runtime)
//! before the filter reports ready, refreshed periodically, refreshed once more — single-flight
//! and rate-limited — when a token names an unknown `kid`, and kept (stale) when a refresh fails.
//! One key set per URL is shared by every filter and config version that names it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};
use once_cell::sync::Lazy;

/// A verification key and the algorithm family it belongs to.
pub struct KeyEntry {
    pub algorithm: Option<Algorithm>,
    pub key: DecodingKey,
}

type KeyMap = HashMap<String, Arc<KeyEntry>>;

pub struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: ArcSwap<KeyMap>,
    ready: AtomicBool,
    /// The key set's own `Cache-Control: max-age`, in seconds (0: none given).
    max_age: AtomicU64,
    /// When a token with an unknown `kid` last caused a fetch (those are rate-limited).
    last_on_demand: Mutex<Option<Instant>>,
    refresh_lock: tokio::sync::Mutex<()>,
    min_interval: Duration,
    /// Fetches that succeeded, and those that failed (the stale keys were kept).
    refreshes: prometheus::IntCounter,
    refresh_failures: prometheus::IntCounter,
}

use crate::shared::IO as RUNTIME;

static SHARED: Lazy<Mutex<HashMap<String, Weak<Jwks>>>> = Lazy::new(Default::default);

/// Settings of a key set.
#[derive(Clone, Copy, Debug)]
pub struct JwksSettings {
    pub timeout: Duration,
    pub refresh_every: Duration,
    pub min_interval: Duration,
}

impl Jwks {
    /// The key set at `url`, shared with any live filter that already uses it.
    pub fn shared(url: &str, settings: JwksSettings, metrics: &crate::Metrics) -> Arc<Jwks> {
        let mut shared = SHARED.lock().expect("JWKS registry lock");
        shared.retain(|_, weak| weak.strong_count() > 0);
        if let Some(existing) = shared.get(url).and_then(Weak::upgrade) {
            return existing;
        }
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .build()
            .expect("build the JWKS HTTP client");
        let jwks = Arc::new(Jwks {
            url: url.to_string(),
            client,
            keys: ArcSwap::from_pointee(HashMap::new()),
            ready: AtomicBool::new(false),
            max_age: AtomicU64::new(0),
            last_on_demand: Mutex::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
            min_interval: settings.min_interval,
            refreshes: metrics.counter(
                "gatehouse_jwks_refreshes_total",
                "JWKS key-set fetches that succeeded",
            ),
            refresh_failures: metrics.counter(
                "gatehouse_jwks_refresh_failures_total",
                "JWKS key-set fetches that failed (the stale keys were kept)",
            ),
        });
        shared.insert(url.to_string(), Arc::downgrade(&jwks));
        let weak = Arc::downgrade(&jwks);
        let refresh_every = settings.refresh_every;
        RUNTIME.spawn(async move {
            loop {
                let ready = {
                    let Some(jwks) = weak.upgrade() else { return };
                    jwks.refresh_now().await;
                    jwks.is_ready()
                };
                // Until the first fetch succeeds, retry soon; then at the refresh interval.
                let wait = if ready {
                    refresh_every
                } else {
                    Duration::from_millis(500)
                };
                tokio::time::sleep(wait).await;
            }
        });
        jwks
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn get(&self, kid: &str) -> Option<Arc<KeyEntry>> {
        self.keys.load().get(kid).cloned()
    }

    /// Keys without a `kid` are stored under "".
    pub fn only_key(&self) -> Option<Arc<KeyEntry>> {
        let keys = self.keys.load();
        if keys.len() == 1 {
            keys.values().next().cloned()
        } else {
            None
        }
    }

    async fn refresh_now(&self) {
        match self.fetch().await {
            Ok(keys) => {
                self.keys.store(Arc::new(keys));
                self.ready.store(true, Ordering::Release);
                self.refreshes.inc();
            }
            Err(error) => {
                self.refresh_failures.inc();
                tracing::warn!(url = %self.url, %error, "JWKS refresh failed; keeping the keys already known");
            }
        }
    }

    async fn fetch(&self) -> Result<KeyMap, String> {
        let response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value.split(',').find_map(|directive| {
                    directive
                        .trim()
                        .strip_prefix("max-age=")?
                        .parse::<u64>()
                        .ok()
                })
            })
            .unwrap_or(0);
        self.max_age.store(max_age, Ordering::Relaxed);
        let set: JwkSet = response
            .json()
            .await
            .map_err(|error| format!("not a JWK set: {error}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let algorithm = jwk
                .common
                .key_algorithm
                .and_then(|algorithm| Algorithm::try_from(algorithm).ok());
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    keys.insert(
                        jwk.common.key_id.clone().unwrap_or_default(),
                        Arc::new(KeyEntry { algorithm, key }),
                    );
                }
                Err(error) => {
                    tracing::warn!(url = %self.url, kid = ?jwk.common.key_id, %error, "skipping an unusable JWK")
                }
            }
        }
        Ok(keys)
    }

    /// A token named `kid`, which is not known: refresh once, shared by every request waiting for
    /// it, and at most once per `min_interval`.
    pub async fn refresh_for(self: &Arc<Self>, kid: &str) -> Option<Arc<KeyEntry>> {
        let jwks = self.clone();
        let kid = kid.to_string();
        // Fetch on the JWKS runtime, whatever runtime the request runs on.
        RUNTIME
            .spawn(async move {
                let _flight = jwks.refresh_lock.lock().await;
                if let Some(found) = jwks.get(&kid) {
                    return Some(found);
                }
                let allowed = {
                    let mut last = jwks.last_on_demand.lock().expect("JWKS fetch time lock");
                    let allowed = last.is_none_or(|last| last.elapsed() >= jwks.min_interval);
                    if allowed {
                        *last = Some(Instant::now());
                    }
                    allowed
                };
                if allowed {
                    jwks.refresh_now().await;
                }
                jwks.get(&kid)
            })
            .await
            .ok()
            .flatten()
    }
}
