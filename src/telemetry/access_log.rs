//! The access log: one JSON line per request, appended to its thread's buffer, which a writer
//! thread empties ten times a second. The request path never waits on I/O and never wakes the writer
//! (a wake-up per line costs a context switch per request). When the writer falls behind (the
//! buffer holds [`BUFFER_LIMIT`] bytes), lines are dropped and counted.
//!
//! A file is reopened on SIGUSR1, the way logrotate expects: the writer finishes the lines it
//! holds into the old file, then opens the path again, so no line is lost or split across the
//! two. [`flush`] writes what is buffered before the process exits. The sample rate follows the
//! live config.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use once_cell::sync::OnceCell;

use super::worker::{Shards, Worker};

static WRITER: OnceCell<Option<AccessLog>> = OnceCell::new();

/// The fraction of requests logged, as `f64` bits: the live config's, changed on reload.
static SAMPLE: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

/// Bytes of lines waiting for the writer; past it new lines are dropped.
pub const BUFFER_LIMIT: usize = 16 * 1024 * 1024;

/// How often the writer empties the buffer.
const INTERVAL: Duration = Duration::from_millis(100);

struct AccessLog {
    shared: Arc<Shared>,
    dropped: prometheus::IntCounter,
    /// The writer, until its thread starts with the first line.
    pending: Mutex<Option<Writer>>,
}

struct Shared {
    /// Lines, one buffer per request thread (a lock per request that every thread shared would
    /// serialise them); `buffered` counts their bytes.
    buffers: Shards<Vec<u8>>,
    buffered: AtomicUsize,
    worker: Worker,
}

/// Where lines go.
enum Output {
    Stdout,
    Stderr,
    File(PathBuf),
}

struct Writer {
    shared: Arc<Shared>,
    output: Output,
    file: Option<std::fs::File>,
    reopen: Arc<AtomicBool>,
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Start the log for `path` (`stdout`, `stderr`, `off`, or a file, opened here so that a path
/// that cannot be written stops the start). Only the first call has effect: where the log goes
/// is fixed at start; the sample rate follows reloads ([`set_sample`]).
pub fn init(path: &str, sample: f64, metrics: &gatehouse_filters::Metrics) -> std::io::Result<()> {
    set_sample(sample);
    if WRITER.get().is_some() {
        return Ok(());
    }
    let dropped = metrics.counter(
        "gatehouse_access_log_dropped_total",
        "Access log lines dropped because the writer fell behind",
    );
    // SIGUSR1 reopens the file; registered whatever the output, so that a logrotate rule
    // signalling every node never stops one (SIGUSR1's default action ends the process).
    let reopen = Arc::new(AtomicBool::new(false));
    if let Err(error) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, reopen.clone()) {
        tracing::warn!(%error, "cannot listen for SIGUSR1: the access log will not be reopened");
    }
    let (output, file) = match path {
        "off" | "" => {
            let _ = WRITER.set(None);
            return Ok(());
        }
        "stdout" => (Output::Stdout, None),
        "stderr" => (Output::Stderr, None),
        file => {
            let file_path = PathBuf::from(file);
            let opened = open(&file_path)?;
            (Output::File(file_path), Some(opened))
        }
    };
    let shared = Arc::new(Shared {
        buffers: Shards::new(),
        buffered: AtomicUsize::new(0),
        worker: Worker::new(),
    });
    let _ = WRITER.set(Some(AccessLog {
        shared: shared.clone(),
        dropped,
        pending: Mutex::new(Some(Writer {
            shared,
            output,
            file,
            reopen,
        })),
    }));
    Ok(())
}

/// The sample rate from now on (the live config's `telemetry.access_log.sample`).
pub fn set_sample(sample: f64) {
    SAMPLE.store(sample.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
}

/// Whether a line should be built for this request at all.
pub fn wanted() -> bool {
    match WRITER.get() {
        Some(Some(_)) => {
            let sample = f64::from_bits(SAMPLE.load(Ordering::Relaxed));
            sample >= 1.0 || (sample > 0.0 && fastrand::f64() < sample)
        }
        _ => false,
    }
}

/// Appends one line, which `write_line` writes into the buffer (without its newline).
pub fn write_with(write_line: impl FnOnce(&mut Vec<u8>)) {
    let Some(Some(log)) = WRITER.get() else {
        return;
    };
    log.shared.worker.start("access-log", || {
        let writer = log.pending.lock().expect("access log writer").take();
        writer.map(|writer| move || writer.run())
    });
    if log.shared.buffered.load(Ordering::Relaxed) >= BUFFER_LIMIT {
        log.dropped.inc();
        return;
    }
    let mut buffer = log.shared.buffers.local();
    let before = buffer.len();
    write_line(&mut buffer);
    buffer.push(b'\n');
    log.shared
        .buffered
        .fetch_add(buffer.len() - before, Ordering::Relaxed);
}

/// Writes the buffered lines out, waiting up to `limit` (before the process exits).
pub fn flush(limit: Duration) {
    if let Some(Some(log)) = WRITER.get() {
        log.shared.worker.flush(limit);
    }
}

impl Writer {
    fn sink(&mut self) -> Box<dyn Write + Send> {
        match (&self.output, self.file.take()) {
            (Output::Stdout, _) => Box::new(std::io::stdout()),
            (Output::Stderr, _) => Box::new(std::io::stderr()),
            (Output::File(_), Some(file)) => Box::new(file),
            (Output::File(path), None) => match open(path) {
                Ok(file) => Box::new(file),
                Err(error) => {
                    tracing::error!(%error, path = %path.display(), "cannot open the access log");
                    Box::new(std::io::sink())
                }
            },
        }
    }

    fn run(mut self) {
        let mut output = self.sink();
        // Emptied buffers, given back to the request threads in place of full ones.
        let mut spares: Vec<Vec<u8>> = Vec::new();
        loop {
            let flush = self.shared.worker.wait(INTERVAL);
            // Whole lines only: each buffer is taken between two of them, and written once the
            // request threads have their (emptied) buffers back.
            let mut taken: Vec<Vec<u8>> = Vec::new();
            self.shared.buffers.each(|buffer| {
                if !buffer.is_empty() {
                    taken.push(std::mem::replace(buffer, spares.pop().unwrap_or_default()));
                }
            });
            for mut chunk in taken {
                self.shared
                    .buffered
                    .fetch_sub(chunk.len(), Ordering::Relaxed);
                if let Err(error) = output.write_all(&chunk) {
                    tracing::warn!(%error, "cannot write the access log");
                }
                chunk.clear();
                spares.push(chunk);
            }
            let _ = output.flush();
            if self.reopen.swap(false, Ordering::Relaxed) {
                // Every line so far went to the file as it was; the next ones go to the path
                // anew.
                if let Output::File(path) = &self.output {
                    match open(path) {
                        Ok(file) => {
                            output = Box::new(file);
                            tracing::info!(path = %path.display(), "access log reopened");
                        }
                        Err(error) => tracing::error!(
                            %error,
                            path = %path.display(),
                            "cannot reopen the access log; writing on to the old file"
                        ),
                    }
                }
            }
            if flush {
                self.shared.worker.flushed();
            }
        }
    }
}
