//! The access log: one JSON line per request, handed to a writer thread through a bounded
//! channel so the request path never waits on I/O. Lines are dropped (and counted) if the
//! writer falls behind.
//!
//! A file is reopened on SIGUSR1, the way logrotate expects: the writer finishes the lines it
//! holds into the old file, then opens the path again, so no line is lost or split across the
//! two. The sample rate follows the live config.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use once_cell::sync::OnceCell;

static WRITER: OnceCell<Option<AccessLog>> = OnceCell::new();

/// The fraction of requests logged, as `f64` bits: the live config's, changed on reload.
static SAMPLE: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

struct AccessLog {
    sender: SyncSender<String>,
    dropped: prometheus::IntCounter,
    /// The writer thread starts with the first line, so that it runs in the process that
    /// serves (a `--daemon` start forks after the log is opened, and threads do not survive a
    /// fork).
    start: Once,
    pending: Mutex<Option<Writer>>,
}

/// Where lines go.
enum Output {
    Stdout,
    Stderr,
    File(PathBuf),
}

struct Writer {
    receiver: Receiver<String>,
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
    let (sender, receiver) = sync_channel::<String>(16 * 1024);
    let _ = WRITER.set(Some(AccessLog {
        sender,
        dropped,
        start: Once::new(),
        pending: Mutex::new(Some(Writer {
            receiver,
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

pub fn write(line: String) {
    let Some(Some(log)) = WRITER.get() else {
        return;
    };
    log.start.call_once(|| {
        let writer = log.pending.lock().expect("access log writer").take();
        if let Some(writer) = writer {
            if let Err(error) = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer.run())
            {
                tracing::error!(%error, "cannot start the access log writer");
            }
        }
    });
    if let Err(TrySendError::Full(_)) = log.sender.try_send(line) {
        log.dropped.inc();
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
        let mut output = std::io::BufWriter::with_capacity(64 * 1024, self.sink());
        loop {
            let received = self.receiver.recv_timeout(Duration::from_millis(200));
            match received {
                Ok(line) => {
                    let _ = output.write_all(line.as_bytes());
                    let _ = output.write_all(b"\n");
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = output.flush();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = output.flush();
                    return;
                }
            }
            if self.reopen.swap(false, Ordering::Relaxed) {
                // Every line so far goes to the file as it was; the next ones to the path anew.
                let _ = output.flush();
                if let Output::File(path) = &self.output {
                    match open(path) {
                        Ok(file) => {
                            output = std::io::BufWriter::with_capacity(64 * 1024, Box::new(file));
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
        }
    }
}
