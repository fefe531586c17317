//! Counters and latency histograms of one node, published in `NodeLoad` and served on
//! `/metrics` (Prometheus text format).

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
    /// How long things take (histograms, in seconds).
    pub latency: Latencies,
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

/// Upper bounds (s) of the latency buckets: 1 ms to 10 s.
const FAST_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds (s) of the migration buckets: 10 ms to 2 min.
const SLOW_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// The node's latency histograms (names without the `twinmesh_` prefix).
#[derive(Clone)]
pub struct Latencies {
    /// A twin takes a batch of frames until its acknowledgement is published (after the
    /// flush that makes it durable).
    pub ingest_ack: prometheus::Histogram,
    /// A twin call made by this node (gRPC and dashboard calls, the authority's and a
    /// release's calls), from the request to the reply, retries included.
    pub rpc: prometheus::Histogram,
    /// One window's analysis (the chain's edge stages) on a twin of this node.
    pub window_analysis: prometheus::Histogram,
    /// A migration the placement authority ran, from its start to the commit.
    pub migration: prometheus::Histogram,
}

impl Latencies {
    fn histogram(name: &str, help: &str, buckets: &[f64]) -> prometheus::Histogram {
        prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        )
        .expect("valid histogram options")
    }

    /// Every histogram, to register in a scrape's registry.
    pub fn all(&self) -> [&prometheus::Histogram; 4] {
        [
            &self.ingest_ack,
            &self.rpc,
            &self.window_analysis,
            &self.migration,
        ]
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            ingest_ack: Self::histogram(
                "ingest_ack_seconds",
                "From a twin taking a batch of frames to its durable acknowledgement.",
                &FAST_BUCKETS,
            ),
            rpc: Self::histogram(
                "rpc_seconds",
                "Twin calls made by this node, from request to reply (retries included).",
                &FAST_BUCKETS,
            ),
            window_analysis: Self::histogram(
                "window_analysis_seconds",
                "Analysis of one window (the chain's edge stages).",
                &FAST_BUCKETS,
            ),
            migration: Self::histogram(
                "migration_seconds",
                "Migrations run by the placement authority, from start to commit.",
                &SLOW_BUCKETS,
            ),
        }
    }
}

impl std::fmt::Debug for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latencies")
            .field("ingest_ack", &self.ingest_ack.get_sample_count())
            .field("rpc", &self.rpc.get_sample_count())
            .field("window_analysis", &self.window_analysis.get_sample_count())
            .field("migration", &self.migration.get_sample_count())
            .finish()
    }
}
