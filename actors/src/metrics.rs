//! Counters of one node, published in `NodeLoad` and served on `/metrics`.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use twinmesh_twins::frame::FrameRejection;

/// Most distinct (source, reason) pairs remembered for log suppression.
const MAX_LOGGED_SOURCES: usize = 10_000;

#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub frames_in: AtomicU64,
    pub samples_in: AtomicU64,
    pub frames_duplicate: AtomicU64,
    pub frames_gap: AtomicU64,
    /// Frames dropped because a twin's ingest queue was full (the gateway re-sends them).
    pub frames_overflow: AtomicU64,
    /// Frames of protected signals a gateway did not publish: it has no site key.
    pub frames_withheld: AtomicU64,
    /// Identifier records a gateway did not publish (suppressed by the policy, or no
    /// site key to pseudonymise them with).
    pub identifiers_withheld: AtomicU64,
    /// Identifier records a twin refused (not pseudonymised as its policy demands).
    pub identifiers_rejected: AtomicU64,
    pub frames_published: AtomicU64,
    pub bytes_published: AtomicU64,
    pub rpc_served: AtomicU64,
    /// Of those, `GetTwin`s the router answered from a twin's read cache.
    pub rpc_cached: AtomicU64,
    pub twin_restarts: AtomicU64,
    /// Twins stopped after being idle (registered, no actor) and woken again.
    pub twins_passivated: AtomicU64,
    pub twins_woken: AtomicU64,
    /// Feature values kept by the cloud archive.
    pub features_archived: AtomicU64,
    /// Feature windows scored by twins' anomaly models, and alarms they raised.
    pub windows_scored: AtomicU64,
    pub alarms_raised: AtomicU64,
    /// Fabric messages (control, acks, placements, ...) that did not decode: dropped.
    pub messages_malformed: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    logged: Mutex<HashSet<(String, &'static str)>>,
}

impl NodeMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    /// Counts a dropped frame and logs it once per (source key, reason).
    pub fn reject(&self, source: &str, why: &FrameRejection) {
        *self
            .rejected
            .lock()
            .expect("metrics lock")
            .entry(why.as_str())
            .or_default() += 1;
        let mut logged = self.logged.lock().expect("metrics lock");
        if logged.len() < MAX_LOGGED_SOURCES && logged.insert((source.to_owned(), why.as_str())) {
            tracing::warn!(source, reason = why.as_str(), "dropped telemetry frame: {why} (further frames like this from this source are counted, not logged)");
        }
    }

    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        self.rejected.lock().expect("metrics lock").clone()
    }
}
