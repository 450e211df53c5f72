//! Where a node's database sync stands, for `/config`, `/readyz` and `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use gatehouse_filters::metrics::SampledRow;
use gatehouse_filters::util::now_millis;

/// Where a node's database sync stands, for `/config`, `/readyz` and `/metrics`.
#[derive(Default)]
pub struct SourceState {
    pub up: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    /// Newest version seen in the database (from a load or a notification); -1: none.
    pub latest_version: AtomicI64,
    pub latest_created_ms: AtomicU64,
    /// Version this node serves; -1: none.
    pub applied_version: AtomicI64,
    pub applied_created_ms: AtomicU64,
    pub last_rejected_version: AtomicI64,
    /// The last full read, in Unix milliseconds.
    pub last_sync_ms: AtomicU64,
    pub booted_from_snapshot: AtomicBool,
}

impl SourceState {
    pub fn new() -> SourceState {
        let state = SourceState::default();
        state.latest_version.store(-1, Ordering::Relaxed);
        state.applied_version.store(-1, Ordering::Relaxed);
        state.last_rejected_version.store(-1, Ordering::Relaxed);
        state
    }

    pub(super) fn down(&self, error: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(error, "PostgreSQL lost; serving the last applied config");
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
    }

    pub(super) fn saw(&self, version: i64, created_ms: Option<u64>) {
        let previous = self.latest_version.fetch_max(version, Ordering::Relaxed);
        // A notification carries no time (its load, right after, sets the commit time).
        if version > previous || (version == previous && created_ms.is_some()) {
            self.latest_created_ms
                .store(created_ms.unwrap_or_else(now_millis), Ordering::Relaxed);
        }
    }

    /// Versions in the database this node has not decided yet (a rejected one is decided: the
    /// node is in sync, serving the version before it).
    pub fn versions_behind(&self) -> i64 {
        self.versions_behind_from(self.applied_version.load(Ordering::Relaxed))
    }

    fn versions_behind_from(&self, applied: i64) -> i64 {
        let latest = self.latest_version.load(Ordering::Relaxed);
        let decided = applied.max(self.last_rejected_version.load(Ordering::Relaxed));
        (latest - decided).max(0)
    }

    /// What `/config` shows: versions, the lag behind the database and the connection state.
    /// `served` is the version the live snapshot was built from: the state records a version
    /// just after swapping it in, so a report read in between takes it from the snapshot and
    /// never shows a version older than the one answering requests.
    pub fn report(&self, served: Option<i64>) -> serde_json::Value {
        let latest = self.latest_version.load(Ordering::Relaxed);
        let applied = self
            .applied_version
            .load(Ordering::Relaxed)
            .max(served.unwrap_or(-1));
        let behind = self.versions_behind_from(applied);
        let lag_seconds = if behind > 0 {
            now_millis().saturating_sub(self.latest_created_ms.load(Ordering::Relaxed)) as f64
                / 1000.0
        } else {
            0.0
        };
        let time = |ms: u64| {
            (ms != 0).then(|| {
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
            })
        };
        let state = if self.up.load(Ordering::Relaxed) {
            "up"
        } else {
            "down"
        };
        let rejected = self.last_rejected_version.load(Ordering::Relaxed);
        serde_json::json!({
            "state": state,
            "last_error": self.last_error.lock().ok().and_then(|error| error.clone()),
            "applied_version": (applied >= 0).then_some(applied),
            "applied_version_created_at": time(self.applied_created_ms.load(Ordering::Relaxed)),
            "latest_version": (latest >= 0).then_some(latest),
            "versions_behind": behind,
            "lag_seconds": lag_seconds,
            "last_rejected_version": (rejected >= 0).then_some(rejected),
            "last_sync": time(self.last_sync_ms.load(Ordering::Relaxed)),
            "booted_from_snapshot": self.booted_from_snapshot.load(Ordering::Relaxed),
        })
    }

    /// Exports the state in `/metrics` for as long as the returned rows are kept.
    pub fn export(self: &Arc<Self>, metrics: &gatehouse_filters::Metrics) -> Vec<SampledRow> {
        let state = Arc::downgrade(self);
        let read = move |value: fn(&SourceState) -> i64| {
            let state = state.clone();
            move || state.upgrade().map_or(0, |state| value(&state))
        };
        vec![
            metrics
                .sampled(
                    "gatehouse_config_source_up",
                    "Whether the config database is connected (1) or not (0)",
                    &["source"],
                )
                .row(
                    &["postgres"],
                    read(|state| i64::from(state.up.load(Ordering::Relaxed))),
                ),
            metrics
                .sampled(
                    "gatehouse_config_database_version",
                    "The config_versions id this node serves",
                    &[],
                )
                .row(
                    &[],
                    read(|state| state.applied_version.load(Ordering::Relaxed)),
                ),
            metrics
                .sampled(
                    "gatehouse_config_database_versions_behind",
                    "Versions committed in the database that this node does not serve yet",
                    &[],
                )
                .row(&[], read(SourceState::versions_behind)),
        ]
    }
}
