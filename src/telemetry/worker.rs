//! The background thread of the access log writer and of the trace exporter: started with the
//! first piece of work (so that it runs in the process that serves: a `--daemon` start forks
//! after telemetry is set up, and threads do not survive a fork), woken by its timer or when
//! asked, and flushed on request with a wait bounded by the caller; and the sharded buffers
//! the request threads hand it work through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use once_cell::sync::OnceCell;

pub struct Worker {
    start: Once,
    thread: OnceCell<std::thread::Thread>,
    flush_requested: AtomicBool,
    /// Flushes done, counted, so that [`Worker::flush`] can wait for the next one.
    flushed: Mutex<u64>,
    flushed_changed: Condvar,
}

impl Default for Worker {
    fn default() -> Self {
        Worker::new()
    }
}

impl Worker {
    pub fn new() -> Worker {
        Worker {
            start: Once::new(),
            thread: OnceCell::new(),
            flush_requested: AtomicBool::new(false),
            flushed: Mutex::new(0),
            flushed_changed: Condvar::new(),
        }
    }

    /// Runs what `take` hands over on a thread called `name`, the first time only.
    pub fn start<F: FnOnce() + Send + 'static>(
        &self,
        name: &str,
        take: impl FnOnce() -> Option<F>,
    ) {
        self.start.call_once(|| {
            let Some(run) = take() else {
                return;
            };
            match std::thread::Builder::new().name(name.into()).spawn(run) {
                Ok(handle) => {
                    let _ = self.thread.set(handle.thread().clone());
                }
                Err(error) => tracing::error!(%error, thread = name, "cannot start the thread"),
            }
        });
    }

    /// Wakes the thread now rather than at its next round.
    pub fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Asks for a round that writes everything handed over so far, and waits up to `limit`
    /// for it. False when the time ran out (or no thread ever started).
    pub fn flush(&self, limit: Duration) -> bool {
        let Some(thread) = self.thread.get() else {
            return self.start.is_completed();
        };
        let mut flushed = self.flushed.lock().expect("worker flush");
        let target = *flushed + 1;
        self.flush_requested.store(true, Ordering::Release);
        thread.unpark();
        let deadline = Instant::now() + limit;
        while *flushed < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            flushed = self
                .flushed_changed
                .wait_timeout(flushed, left)
                .expect("worker flush")
                .0;
        }
        true
    }

    /// On the thread: sleeps until woken or `interval` has passed; true when a flush was asked
    /// for, to be answered with [`Worker::flushed`] once the round's work is written.
    pub fn wait(&self, interval: Duration) -> bool {
        std::thread::park_timeout(interval);
        self.flush_requested.swap(false, Ordering::Acquire)
    }

    /// On the thread: a flush asked for is done.
    pub fn flushed(&self) {
        *self.flushed.lock().expect("worker flush") += 1;
        self.flushed_changed.notify_all();
    }
}

/// Buffers that request threads write to without a lock they all share: each thread takes the
/// shard of its own index (threads beyond [`SHARDS`] share), and the worker drains every shard
/// in turn.
pub struct Shards<T> {
    shards: Vec<Mutex<T>>,
}

/// Shards per buffer: more than the worker threads a node usually runs.
pub const SHARDS: usize = 16;

impl<T: Default> Shards<T> {
    pub fn new() -> Shards<T> {
        Shards {
            shards: (0..SHARDS).map(|_| Mutex::new(T::default())).collect(),
        }
    }
}

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Shards::new()
    }
}

impl<T> Shards<T> {
    /// The calling thread's shard.
    pub fn local(&self) -> std::sync::MutexGuard<'_, T> {
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        let index = INDEX.with(|index| *index);
        self.shards[index].lock().expect("telemetry shard")
    }

    /// Each shard in turn, for the worker.
    pub fn each(&self, mut visit: impl FnMut(&mut T)) {
        for shard in &self.shards {
            visit(&mut shard.lock().expect("telemetry shard"));
        }
    }
}
