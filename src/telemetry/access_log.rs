//! The access log: one JSON line per request, appended to a shared buffer that a writer thread
//! empties ten times a second. The request path never waits on I/O and never wakes the writer
//! (a wake-up per line costs a context switch per request). When the writer falls behind (the
//! buffer holds [`BUFFER_LIMIT`] bytes), lines are dropped and counted.
//!
//! A file is reopened on SIGUSR1, the way logrotate expects: the writer finishes the lines it
//! holds into the old file, then opens the path again, so no line is lost or split across the
//! two. [`flush`] writes what is buffered before the process exits. The sample rate follows the
//! live config.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use once_cell::sync::OnceCell;

use super::worker::Worker;

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
    buffer: Mutex<Vec<u8>>,
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
        buffer: Mutex::new(Vec::with_capacity(64 * 1024)),
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

/// Appends one line, which `write_line` writes into the buffer (without its newline); a line
/// it fails to write is taken back whole.
pub fn write_with(write_line: impl FnOnce(&mut Vec<u8>) -> bool) {
    let Some(Some(log)) = WRITER.get() else {
        return;
    };
    log.shared.worker.start("access-log", || {
        let writer = log.pending.lock().expect("access log writer").take();
        writer.map(|writer| move || writer.run())
    });
    let mut buffer = log.shared.buffer.lock().expect("access log buffer");
    if buffer.len() >= BUFFER_LIMIT {
        drop(buffer);
        log.dropped.inc();
        return;
    }
    let before = buffer.len();
    if write_line(&mut buffer) {
        buffer.push(b'\n');
    } else {
        buffer.truncate(before);
    }
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
        let mut spare: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let flush = self.shared.worker.wait(INTERVAL);
            // Whole lines only: the buffer is taken between two of them.
            std::mem::swap(
                &mut *self.shared.buffer.lock().expect("access log buffer"),
                &mut spare,
            );
            if !spare.is_empty() {
                if let Err(error) = output.write_all(&spare) {
                    tracing::warn!(%error, "cannot write the access log");
                }
                spare.clear();
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
