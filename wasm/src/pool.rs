//! The instances of one configured plugin: started ahead (each has run `_initialize`,
//! `on_vm_start` and `on_configure`), checked out by a request for its whole life, and given
//! back after it (`pooled`), or started for each request and dropped after it
//! (`per_request`). An instance that failed is never given back; starting a new one after a
//! failed start waits out a backoff. The root context's ticks run on an instance of their own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::engine::Compiled;
use crate::instance::{Bounds, Failure, Instance, Live};
use crate::plugin::Plugin;

/// The first wait after a failed start; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Pool {
    pub compiled: Arc<Compiled>,
    pub plugin: Arc<Plugin>,
    pub bounds: Bounds,
    /// Instances are given back after a request (`pooled`), not dropped (`per_request`).
    pub reuse: bool,
    pub max_idle: usize,
    /// The most instances alive at once (idle, serving a request, or ticking).
    pub max_instances: usize,
    live: Arc<AtomicUsize>,
    idle: Mutex<Vec<Instance>>,
    backoff: Mutex<Backoff>,
}

#[derive(Default)]
struct Backoff {
    until: Option<Instant>,
    next: Duration,
}

impl Pool {
    /// A pool holding `first`, the instance the build started to check the module.
    pub fn new(
        compiled: Arc<Compiled>,
        plugin: Arc<Plugin>,
        bounds: Bounds,
        reuse: bool,
        max_idle: usize,
        max_instances: usize,
        mut first: Instance,
    ) -> Arc<Pool> {
        let tick_period = first.tick_period_ms();
        let live = Arc::new(AtomicUsize::new(1));
        first.live = Some(Live(live.clone()));
        let pool = Arc::new(Pool {
            compiled,
            plugin,
            bounds,
            reuse,
            max_idle,
            max_instances,
            live,
            idle: Mutex::new(Vec::new()),
            backoff: Mutex::new(Backoff::default()),
        });
        if tick_period > 0 {
            // The build's instance asked for ticks: it becomes the tick instance.
            start_ticks(Arc::downgrade(&pool), first, tick_period);
        } else if reuse {
            pool.give_back(first);
        }
        pool
    }

    /// An instance for one request.
    pub fn checkout(&self) -> Result<Instance, Failure> {
        if self.reuse {
            if let Some(instance) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
                return Ok(instance);
            }
        }
        self.start()
    }

    /// Starts a new instance, unless a failed start's backoff is still running.
    fn start(&self) -> Result<Instance, Failure> {
        if let Ok(backoff) = self.backoff.lock() {
            if backoff.until.is_some_and(|until| Instant::now() < until) {
                return Err(Failure::Unavailable);
            }
        }
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max_instances {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(Failure::Unavailable);
        }
        let live = Live(self.live.clone());
        match Instance::start(&self.compiled, self.plugin.clone(), self.bounds) {
            Ok(mut instance) => {
                instance.live = Some(live);
                if let Ok(mut backoff) = self.backoff.lock() {
                    *backoff = Backoff::default();
                }
                Ok(instance)
            }
            Err(failure) => {
                if let Ok(mut backoff) = self.backoff.lock() {
                    let wait = if backoff.next.is_zero() {
                        FIRST_BACKOFF
                    } else {
                        backoff.next
                    };
                    backoff.until = Some(Instant::now() + wait);
                    backoff.next = (wait * 2).min(MAX_BACKOFF);
                }
                self.plugin.failed(failure.reason(), &failure.to_string());
                Err(failure)
            }
        }
    }

    /// Takes back an instance whose request ended well.
    pub fn give_back(&self, instance: Instance) {
        if !self.reuse {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(instance);
            }
        }
    }

    /// Instances waiting for a request.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }
}

/// Calls `on_tick` on `instance` every `period_ms` for as long as the pool lives. An instance
/// that fails is replaced (with the pool's backoff).
fn start_ticks(pool: Weak<Pool>, instance: Instance, period_ms: u32) {
    let period = Duration::from_millis(u64::from(period_ms.max(1)));
    let spawned = std::thread::Builder::new()
        .name("gatehouse-wasm-tick".into())
        .spawn(move || {
            let mut ticking = Some(instance);
            loop {
                // Sleep in slices, so the thread (and its instance) ends soon after the pool.
                let mut slept = Duration::ZERO;
                while slept < period {
                    let slice = (period - slept).min(Duration::from_millis(500));
                    std::thread::sleep(slice);
                    slept += slice;
                    if pool.strong_count() == 0 {
                        return;
                    }
                }
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let mut instance = match ticking.take() {
                    Some(instance) => instance,
                    None => match pool.start() {
                        Ok(instance) => instance,
                        Err(_) => continue,
                    },
                };
                match instance.tick() {
                    Ok(()) => ticking = Some(instance),
                    Err(failure) => pool
                        .plugin
                        .failed(failure.reason(), &format!("on_tick: {failure}")),
                }
            }
        });
    if let Err(error) = spawned {
        tracing::error!("the wasm tick thread did not start: {error}");
    }
}
