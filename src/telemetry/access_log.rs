//! The access log: one JSON line per request, handed to a writer thread through a bounded
//! channel so the request path never waits on I/O. Lines are dropped (and counted) if the
//! writer falls behind.

use std::io::Write;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use once_cell::sync::OnceCell;

static WRITER: OnceCell<Option<AccessLog>> = OnceCell::new();

pub struct AccessLog {
    sender: SyncSender<String>,
    sample: f64,
    dropped: prometheus::IntCounter,
}

/// Start the writer for `path` (`stdout`, `off`, or a file). Only the first call has effect:
/// where the log goes is fixed at start.
pub fn init(path: &str, sample: f64, metrics: &gatehouse_filters::Metrics) -> std::io::Result<()> {
    if WRITER.get().is_some() {
        return Ok(());
    }
    let dropped = metrics.counter(
        "gatehouse_access_log_dropped_total",
        "Access log lines dropped because the writer fell behind",
    );
    let output: Option<Box<dyn Write + Send>> = match path {
        "off" | "" => None,
        "stdout" => Some(Box::new(std::io::stdout())),
        "stderr" => Some(Box::new(std::io::stderr())),
        file => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)?,
        )),
    };
    let log = output.map(|output| {
        let (sender, receiver) = sync_channel::<String>(16 * 1024);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut output = std::io::BufWriter::with_capacity(64 * 1024, output);
                loop {
                    match receiver.recv_timeout(Duration::from_millis(200)) {
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
                }
            })
            .expect("spawn access log writer");
        AccessLog {
            sender,
            sample,
            dropped,
        }
    });
    let _ = WRITER.set(log);
    Ok(())
}

/// Whether a line should be built for this request at all.
pub fn wanted() -> bool {
    match WRITER.get() {
        Some(Some(log)) => log.sample >= 1.0 || fastrand::f64() < log.sample,
        _ => false,
    }
}

pub fn write(line: String) {
    if let Some(Some(log)) = WRITER.get() {
        if let Err(TrySendError::Full(_)) = log.sender.try_send(line) {
            log.dropped.inc();
        }
    }
}
