//! What every instance of one configured plugin shares: its name and configuration, its shared
//! data and queues, its log, its failure counter, and the calls it was told once are not
//! supported.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use gatehouse_filters::metrics::Family;
use prometheus::IntCounter;

/// The most keys a plugin's shared data may hold.
const MAX_SHARED_KEYS: usize = 10_000;
/// The most items a shared queue may hold.
const MAX_QUEUE_ITEMS: usize = 10_000;
/// The most queues a plugin may register, and the longest name one may have.
const MAX_QUEUES: usize = 1_000;
const MAX_QUEUE_NAME: usize = 1_024;
/// The most bytes a plugin's shared data and queues may hold together.
const MAX_SHARED_BYTES: usize = 64 << 20;
/// The most metrics a plugin may define.
const MAX_METRICS: usize = 1_000;

pub struct Plugin {
    pub name: String,
    pub configuration: Bytes,
    pub shared: Arc<Shared>,
    /// Headers the gateway sets itself besides the forwarding ones (identity, request id),
    /// which a plugin may not set or remove.
    pub gateway_headers: Arc<[http::HeaderName]>,
    /// The plugin's own metrics (`proxy_define_metric`): kept, readable, not exported.
    pub metrics: Mutex<Vec<(Vec<u8>, i64)>>,
    told: Mutex<HashSet<&'static str>>,
    failures: Family<IntCounter>,
}

impl Plugin {
    pub fn new(
        name: String,
        configuration: Bytes,
        gateway_headers: Arc<[http::HeaderName]>,
        failures: Family<IntCounter>,
    ) -> Plugin {
        let shared = shared_for(&name);
        Plugin {
            name,
            configuration,
            shared,
            gateway_headers,
            metrics: Mutex::new(Vec::new()),
            told: Mutex::new(HashSet::new()),
            failures,
        }
    }

    /// The id of the metric `name`, defined now if it is new; `None` past the cap.
    pub fn define_metric(&self, name: Vec<u8>) -> Option<u32> {
        let mut metrics = self.metrics.lock().ok()?;
        if let Some(at) = metrics.iter().position(|(known, _)| *known == name) {
            return Some(at as u32 + 1);
        }
        if metrics.len() >= MAX_METRICS {
            return None;
        }
        metrics.push((name, 0));
        Some(metrics.len() as u32)
    }

    /// Changes metric `id` by `change`; `false` when there is no such metric.
    pub fn update_metric(&self, id: u32, change: impl FnOnce(i64) -> i64) -> bool {
        let Ok(mut metrics) = self.metrics.lock() else {
            return false;
        };
        match metrics.get_mut((id as usize).wrapping_sub(1)) {
            Some((_, value)) => {
                *value = change(*value);
                true
            }
            None => false,
        }
    }

    /// A log line of the module, with the plugin's name. proxy-wasm levels: trace 0 to
    /// critical 5.
    pub fn log(&self, level: u32, message: &str) {
        let plugin = self.name.as_str();
        match level {
            0 => tracing::trace!(target: "gatehouse::wasm", plugin, "{message}"),
            1 => tracing::debug!(target: "gatehouse::wasm", plugin, "{message}"),
            2 => tracing::info!(target: "gatehouse::wasm", plugin, "{message}"),
            3 => tracing::warn!(target: "gatehouse::wasm", plugin, "{message}"),
            _ => tracing::error!(target: "gatehouse::wasm", plugin, "{message}"),
        }
    }

    /// Logs, the first time only, that the module asked for something Gatehouse does not do.
    pub fn unsupported(&self, what: &'static str) {
        let first = self
            .told
            .lock()
            .map(|mut told| told.insert(what))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                target: "gatehouse::wasm",
                plugin = self.name.as_str(),
                "the plugin used {what}, which Gatehouse does not support; logged once"
            );
        }
    }

    /// Counts and logs a failure of an instance.
    pub fn failed(&self, reason: &str, detail: &str) {
        self.failures.with_labels(&[&self.name, reason]).inc();
        tracing::error!(
            target: "gatehouse::wasm",
            plugin = self.name.as_str(),
            reason,
            "the plugin failed: {detail}"
        );
    }
}

/// The level the gateway logs plugins at, in proxy-wasm's numbers.
pub fn log_level() -> u32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        _ => 4,
    }
}

/// Random bytes for `random_get` (a module's hash seeds).
pub fn fill_random(bytes: &mut [u8]) {
    if getrandom::fill(bytes).is_err() {
        bytes.fill(0);
    }
}

/// Whether `set` stored the value.
pub enum Stored {
    Yes,
    /// The compare-and-swap value was not the current one.
    CasMismatch,
    /// The data is at its key cap.
    Full,
}

/// Shared data and queues of one plugin name: every instance on every worker sees them, and
/// they outlive reloads.
#[derive(Default)]
pub struct Shared {
    data: Mutex<HashMap<Vec<u8>, (Bytes, u32)>>,
    queues: Mutex<Queues>,
    /// Bytes held by the data and the queues together.
    bytes: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Queues {
    names: HashMap<Vec<u8>, u32>,
    items: HashMap<u32, VecDeque<Bytes>>,
}

impl Shared {
    /// Takes `more` bytes from the budget (giving back `less`); `false` when it is spent.
    fn budget(&self, more: usize, less: usize) -> bool {
        use std::sync::atomic::Ordering;
        let held = self.bytes.load(Ordering::Relaxed);
        let next = held.saturating_sub(less) + more;
        if more > less && next > MAX_SHARED_BYTES {
            return false;
        }
        self.bytes.store(next, Ordering::Relaxed);
        true
    }
}

impl Shared {
    pub fn get(&self, key: &[u8]) -> Option<(Bytes, u32)> {
        self.data.lock().ok()?.get(key).cloned()
    }

    /// Stores `value` if `cas` is 0 or the key's current compare-and-swap value.
    pub fn set(&self, key: Vec<u8>, value: Vec<u8>, cas: u32) -> Stored {
        let Ok(mut data) = self.data.lock() else {
            return Stored::Full;
        };
        let len = data.len();
        match data.get_mut(&key) {
            Some((kept, current)) => {
                if cas != 0 && cas != *current {
                    return Stored::CasMismatch;
                }
                if !self.budget(value.len(), kept.len()) {
                    return Stored::Full;
                }
                *kept = Bytes::from(value);
                *current = current.wrapping_add(1).max(1);
                Stored::Yes
            }
            None if cas != 0 => Stored::CasMismatch,
            None if len >= MAX_SHARED_KEYS || !self.budget(key.len() + value.len(), 0) => {
                Stored::Full
            }
            None => {
                data.insert(key, (Bytes::from(value), 1));
                Stored::Yes
            }
        }
    }

    /// The queue's token; `None` past the cap on queues or on a name's length.
    pub fn register_queue(&self, name: Vec<u8>) -> Option<u32> {
        let mut queues = self.queues.lock().ok()?;
        if let Some(token) = queues.names.get(&name) {
            return Some(*token);
        }
        if queues.names.len() >= MAX_QUEUES || name.len() > MAX_QUEUE_NAME {
            return None;
        }
        let token = queues.names.len() as u32 + 1;
        queues.names.insert(name, token);
        queues.items.entry(token).or_default();
        Some(token)
    }

    pub fn resolve_queue(&self, name: &[u8]) -> Option<u32> {
        self.queues.lock().ok()?.names.get(name).copied()
    }

    /// `None`: no such queue; `Some(false)`: the queue is full.
    pub fn enqueue(&self, token: u32, item: Vec<u8>) -> Option<bool> {
        let mut queues = self.queues.lock().ok()?;
        let queue = queues.items.get_mut(&token)?;
        if queue.len() >= MAX_QUEUE_ITEMS || !self.budget(item.len(), 0) {
            return Some(false);
        }
        queue.push_back(Bytes::from(item));
        Some(true)
    }

    /// `None`: no such queue; `Some(None)`: it is empty.
    pub fn dequeue(&self, token: u32) -> Option<Option<Bytes>> {
        let mut queues = self.queues.lock().ok()?;
        let item = queues.items.get_mut(&token)?.pop_front();
        if let Some(item) = &item {
            self.budget(0, item.len());
        }
        Some(item)
    }
}

fn shared_for(name: &str) -> Arc<Shared> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<Shared>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .expect("shared data lock");
    all.entry(name.to_string()).or_default().clone()
}
