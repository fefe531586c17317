//! What every actor of a node shares: identity, ports, counters, configuration and the
//! task tracker that owns every background task of the node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use twinmesh_twins::proto::TwinSummary;
use twinmesh_twins::{NodeId, Tier, TwinId};

use crate::metrics::NodeMetrics;
use crate::ports::{SharedClock, SharedFabric, SharedStore};
use crate::tasks::TaskController;

/// Tunables of the twins a node hosts.
#[derive(Debug, Clone)]
pub struct TwinConfig {
    /// Frames larger than this (encoded) are dropped as bad input.
    pub max_frame_bytes: usize,
    /// Frames that decode to more samples than this are dropped as bad input.
    pub max_frame_samples: usize,
    /// Most samples decoded into one ingest batch.
    pub max_batch_samples: usize,
    /// Frames waiting for a twin before the fabric applies back-pressure.
    pub ingest_queue: usize,
    /// Most frames applied (and made durable) together.
    pub ingest_batch: usize,
    /// Least time between two state publications of one twin.
    pub state_interval: Duration,
    /// How often a pending set-point is re-sent to the gateway.
    pub desired_retry: Duration,
    /// Deadline of a call into a twin actor.
    pub call_timeout: Duration,
    /// Least time between two snapshot replications to the cloud.
    pub snapshot_interval: Duration,
    /// Run the chains' edge analysis (off in deterministic simulations: it runs on a
    /// thread pool, outside virtual time).
    pub analysis: bool,
    /// Twins idle this long are snapshotted and stopped; the next frame or call wakes
    /// them (`None`: never).
    pub passivate_after: Option<Duration>,
    /// The ε each site may spend on set releases per period (kept by the placement
    /// authority, so it only matters on cloud nodes).
    pub site_budget: SiteBudget,
    /// How long a freeze lasts when its request names no timeout (a migration not
    /// committed by then is abandoned).
    pub freeze_timeout: Duration,
}

/// A site's allowance for set releases (DESIGN §10: a per-site ledger beside the
/// per-twin ones).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteBudget {
    pub epsilon_per_period: f64,
    pub period_ns: i64,
}

impl Default for SiteBudget {
    fn default() -> Self {
        SiteBudget {
            epsilon_per_period: twinmesh_twins::privacy::DEFAULT_EPSILON_PER_PERIOD,
            period_ns: twinmesh_twins::privacy::DEFAULT_PERIOD_NS,
        }
    }
}

impl Default for TwinConfig {
    fn default() -> Self {
        TwinConfig {
            max_frame_bytes: twinmesh_twins::frame::DEFAULT_MAX_FRAME_BYTES,
            max_frame_samples: twinmesh_twins::frame::DEFAULT_MAX_FRAME_SAMPLES,
            max_batch_samples: twinmesh_twins::frame::DEFAULT_MAX_BATCH_SAMPLES,
            ingest_queue: 256,
            ingest_batch: 128,
            state_interval: Duration::from_millis(50),
            desired_retry: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            snapshot_interval: Duration::from_secs(1),
            analysis: true,
            passivate_after: None,
            site_budget: SiteBudget::default(),
            freeze_timeout: Duration::from_secs(10),
        }
    }
}

/// Summaries of the twins running on this node, kept current by the twins themselves so
/// listing never has to call every actor.
#[derive(Debug, Default)]
pub struct Directory {
    twins: Mutex<BTreeMap<TwinId, TwinSummary>>,
}

impl Directory {
    pub fn upsert(&self, id: &TwinId, summary: TwinSummary) {
        self.twins
            .lock()
            .expect("directory lock")
            .insert(id.clone(), summary);
    }

    /// Sets the status a listing shows (e.g. `dormant`).
    pub fn set_status(&self, id: &TwinId, status: &str) {
        if let Some(t) = self.twins.lock().expect("directory lock").get_mut(id) {
            t.status = status.to_owned();
        }
    }

    pub fn remove(&self, id: &TwinId) {
        self.twins.lock().expect("directory lock").remove(id);
    }

    pub fn len(&self) -> usize {
        self.twins.lock().expect("directory lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<TwinSummary> {
        self.twins
            .lock()
            .expect("directory lock")
            .values()
            .cloned()
            .collect()
    }
}

/// Shared by every actor of one node.
pub struct NodeContext {
    pub node: NodeId,
    pub tier: Tier,
    pub site: String,
    pub fabric: SharedFabric,
    pub store: SharedStore,
    pub clock: SharedClock,
    pub metrics: Arc<NodeMetrics>,
    pub directory: Directory,
    pub twin_config: TwinConfig,
    /// Owns every task the node's actors start; the node waits for it on shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when the node shuts down.
    pub cancel: CancellationToken,
    /// Bounds the analysis windows computed at once on the blocking pool.
    pub analysis_permits: Arc<tokio::sync::Semaphore>,
    /// Node-level dispatch to the twins hosted here (active on edge nodes).
    pub router: Arc<crate::router::Router>,
    /// The site key: seals protected telemetry and contributions on the fabric. Nodes
    /// off the site (and nodes without it) cannot read them.
    pub site_key: Option<Arc<crate::seal::KeyRing>>,
    /// What this node can prove and check on the fabric (callers, proofs).
    pub trust: Arc<crate::trust::Trust>,
}

impl NodeContext {
    /// The caller this node is when it acts itself (coordinates a set release, moves a
    /// twin): a data manager, vouched for like any caller ([`crate::trust::Trust::vouch`]).
    pub fn own_caller(&self) -> twinmesh_twins::proto::Caller {
        twinmesh_twins::proto::Caller {
            role: twinmesh_twins::privacy::Role::DataManager
                .as_str()
                .to_owned(),
            subject: format!("node {}", self.node),
            ..Default::default()
        }
    }

    /// The clock in ms, for caller contexts.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ns().div_euclid(1_000_000)
    }

    pub fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    /// The node's tasks: its tracker and its token.
    pub fn task_controller(&self) -> TaskController {
        TaskController::new(self.tasks.clone(), self.cancel.clone())
    }

    /// Runs `fut` as a task of the node until it ends or the node stops.
    pub fn spawn_until_cancelled<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.task_controller().spawn_until_cancelled(fut);
    }

    /// Stops every task of the node, waiting at most `bound`; false when some task had
    /// not ended by then.
    pub async fn terminate(&self, bound: Duration) -> bool {
        self.task_controller().terminate(bound).await
    }
}
