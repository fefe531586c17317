//! The ports the actors talk through. Only `nodes` knows the real adapters (a Zenoh
//! session, a sled database); `sim` provides in-memory ones for deterministic tests.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use twinmesh_twins::proto::{
    Bucket, Budget, KindModel, ModelRecord, Placement, TelemetryFrame, TwinSnapshot,
};
use twinmesh_twins::stats::Aggregation;
use twinmesh_twins::TwinId;

use crate::error::Result;

/// One message received from the fabric.
#[derive(Debug, Clone)]
pub struct Sample {
    pub key: String,
    pub payload: Bytes,
    pub kind: SampleKind,
    /// The publisher's trace context (`traceparent`), when traces are on
    /// ([`crate::trace`]).
    pub attachment: Option<Bytes>,
}

/// `Delete` only occurs on liveliness subscriptions (a token went away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    Put,
    Delete,
}

/// Delivery guarantee of a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Never dropped: the publisher waits when the link is congested (telemetry, acks,
    /// control, events).
    Reliable,
    /// May be dropped under congestion; a newer one follows (state, load).
    Latest,
}

/// Keeps a declaration (subscriber, queryable, token) alive; dropping it undeclares.
pub type Guard = Box<dyn std::any::Any + Send + Sync>;

/// A stream of samples matching a key expression.
pub struct Subscription {
    pub rx: flume::Receiver<Sample>,
    /// Samples dropped because the channel was full.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
    pub guard: Guard,
}

/// Answers one query. Dropping it without replying ends the query with no reply.
///
/// Replying never waits (it hands the reply to the fabric), so it may run on the
/// fabric's own thread, inside a callback.
pub trait Responder: Send {
    fn reply(self: Box<Self>, key: &str, payload: Bytes, encoding: &'static str);
    /// For queries that collect several replies (e.g. on `twinmesh/placement/**`).
    fn reply_many(self: Box<Self>, replies: Vec<(String, Bytes)>, encoding: &'static str);
}

/// Runs on the fabric's thread for each sample of a callback subscription.
pub type SampleCallback = Box<dyn Fn(Sample) + Send + Sync>;

/// Runs on the fabric's thread for each query of a callback queryable.
pub type QueryCallback = Box<dyn Fn(Query) + Send + Sync>;

/// One query received by a queryable.
pub struct Query {
    pub key: String,
    pub payload: Bytes,
    pub responder: Box<dyn Responder>,
    /// The caller's trace context (`traceparent`), when traces are on ([`crate::trace`]).
    pub attachment: Option<Bytes>,
}

impl Query {
    pub fn reply(self, key: &str, payload: Bytes, encoding: &'static str) {
        self.responder.reply(key, payload, encoding)
    }
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query").field("key", &self.key).finish()
    }
}

pub struct Queryable {
    pub rx: flume::Receiver<Query>,
    pub guard: Guard,
}

/// One reply to a query.
#[derive(Debug, Clone)]
pub struct Reply {
    pub key: String,
    pub payload: Bytes,
}

/// The messaging fabric (DESIGN §6): pub/sub, queries and liveliness over a key space.
#[async_trait]
pub trait Fabric: Send + Sync + 'static {
    async fn publish(
        &self,
        key: &str,
        payload: Bytes,
        encoding: &'static str,
        qos: Qos,
    ) -> Result<()>;

    /// Subscribes to `keyexpr`. At most `capacity` samples wait in the channel; beyond
    /// that, new samples are dropped and counted in [`Subscription::dropped`] — never
    /// blocking the fabric, so one slow consumer cannot stall the node. Every user of a
    /// lossy subscription must tolerate drops (telemetry is re-sent from the spool).
    async fn subscribe(&self, keyexpr: &str, capacity: usize) -> Result<Subscription>;

    /// Like [`Fabric::subscribe`], but runs `callback` on the fabric's own thread for each
    /// sample, saving a channel and a task hop on hot paths; the callback must never
    /// block. Fabrics that cannot do this return `None` (callers then subscribe).
    async fn subscribe_callback(
        &self,
        _keyexpr: &str,
        _callback: SampleCallback,
    ) -> Result<Option<Guard>> {
        Ok(None)
    }

    /// Like [`Fabric::queryable`], but runs `callback` on the fabric's own thread for each
    /// query (it must never block); `None` where the fabric cannot.
    async fn queryable_callback(
        &self,
        _keyexpr: &str,
        _callback: QueryCallback,
    ) -> Result<Option<Guard>> {
        Ok(None)
    }

    /// Serves queries on `keyexpr`; beyond `capacity` waiting queries, new ones are
    /// dropped (the caller times out and retries).
    async fn queryable(&self, keyexpr: &str, capacity: usize) -> Result<Queryable>;

    /// Sends a query and collects every reply until all repliers are done or `timeout`.
    async fn query(
        &self,
        keyexpr: &str,
        payload: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<Vec<Reply>>;

    /// Sends a query and returns its first reply that `accept`s, as soon as it arrives
    /// (`None` when all repliers finished without one, or at `timeout`): a call to one
    /// twin need not wait for the other repliers to say they are done, and a reply from
    /// anyone else (a queryable anyone may declare) does not end it.
    async fn query_first(
        &self,
        keyexpr: &str,
        payload: Option<(Bytes, &'static str)>,
        timeout: Duration,
        accept: &(dyn for<'r> Fn(&'r Reply) -> bool + Send + Sync),
    ) -> Result<Option<Reply>> {
        for reply in self.query(keyexpr, payload, timeout).await? {
            if accept(&reply) {
                return Ok(Some(reply));
            }
        }
        Ok(None)
    }

    /// Declares a liveliness token, withdrawn when the guard is dropped or the node dies.
    async fn liveliness_token(&self, key: &str) -> Result<Guard>;

    /// Watches liveliness tokens matching `keyexpr`: `Put` on appearance (including those
    /// alive at subscription time), `Delete` on loss.
    async fn liveliness_subscribe(&self, keyexpr: &str) -> Result<Subscription>;
}

/// A frame as stored in history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFrame {
    pub signal: String,
    pub seq: u64,
    pub start_ns: i64,
    pub sample_period_ns: i64,
    pub samples: Vec<f64>,
    /// Resolution of the samples (0: unknown); lets the store pack them losslessly.
    pub scale: f64,
}

impl From<twinmesh_twins::proto::TelemetryFrame> for StoredFrame {
    fn from(f: twinmesh_twins::proto::TelemetryFrame) -> Self {
        StoredFrame {
            signal: f.signal,
            seq: f.seq,
            start_ns: f.start_ns,
            sample_period_ns: f.sample_period_ns,
            samples: f.samples,
            scale: f.scale,
        }
    }
}

// --- storage (DESIGN §8) ---
//
// The store port is split by concern, the way TiKV splits `engine_traits`: an actor
// names the one it uses, and an engine implements each on its own. Methods are
// synchronous and fast except the series scans (`query_history`, `read_samples`,
// `read_points`: call them from a blocking pool) and `flush` (durability). [`Store`] is
// all of them, for code that needs a node's whole store.

/// Durability, shared by every concern: one flush covers every write of the node's store.
#[async_trait]
pub trait Durable: Send + Sync + 'static {
    /// Makes every write made before this call durable. Concurrent callers share flushes.
    async fn flush(&self) -> Result<()>;
}

/// Time series (the twins' history; on cloud nodes also the archive of every twin's
/// feature windows, which trainings read).
pub trait SeriesStore: Durable {
    /// Appends frames of one twin. Idempotent: a frame stored twice (same signal, start
    /// and seq) occupies one entry.
    fn append_frames(&self, twin: &TwinId, frames: &[StoredFrame]) -> Result<()>;
    /// Bucketed aggregation of `signal` over `[start_ns, end_ns)`; empty buckets omitted
    /// (bucketing of [`twinmesh_twins::stats::HistoryBuckets`]).
    fn query_history(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        bucket_ns: i64,
        agg: Aggregation,
    ) -> Result<Vec<Bucket>>;
    /// The samples of `signal` in `[start_ns, end_ns)`, in time order, at most `limit`
    /// (the records of a privacy release).
    fn read_samples(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
        limit: usize,
    ) -> Result<Vec<f64>>;
    /// `(time, value)` of every sample of the frames of `signal` that start in
    /// `[start_ns, end_ns)`, in time order (the archive's feature windows, one sample each).
    fn read_points(
        &self,
        twin: &TwinId,
        signal: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<(i64, f64)>>;
    /// Names of the series stored for `twin`, in order.
    fn signals_of(&self, twin: &TwinId) -> Result<Vec<String>>;
    /// Sequence numbers of every stored frame of `signal`, in time order.
    fn frame_seqs(&self, twin: &TwinId, signal: &str) -> Result<Vec<u64>>;
    /// Highest live seq stored for `signal` (imports, with seq 0, do not count).
    fn last_stored_seq(&self, twin: &TwinId, signal: &str) -> Result<u64>;
    /// The lowest seq in `from..=upto` that is not stored for `signal`, if any.
    fn first_missing_seq(
        &self,
        twin: &TwinId,
        signal: &str,
        from: u64,
        upto: u64,
    ) -> Result<Option<u64>>;
}

/// Twin state: snapshots of the twins hosted here, their installed models, and the
/// replicated snapshots the placement authority keeps. A snapshot that names no valid
/// twin is refused with an error ([`twinmesh_twins::snapshot::twin_of`]).
pub trait SnapshotStore: Durable {
    fn save_snapshot(&self, snapshot: &TwinSnapshot) -> Result<()>;
    fn load_snapshot(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>>;
    /// The anomaly model installed on a hosted twin (a `ModelRecord`), kept apart from
    /// the snapshot, which is written on every batch and names the model only.
    fn save_twin_model(&self, twin: &TwinId, record: &ModelRecord) -> Result<()>;
    fn load_twin_model(&self, twin: &TwinId) -> Result<Option<ModelRecord>>;
    /// Keeps `snapshot` if it is newer, by (epoch, revision), than the one held
    /// ([`twinmesh_twins::snapshot::supersedes`]); returns whether it was kept.
    fn save_replica(&self, snapshot: &TwinSnapshot) -> Result<bool>;
    fn load_replica(&self, twin: &TwinId) -> Result<Option<TwinSnapshot>>;
}

/// Where twins live: the placement authority's table and ε ledgers, and the twins this
/// node hosts. A placement that names no valid twin is refused with an error.
pub trait PlacementStore: Durable {
    fn save_placement(&self, placement: &Placement) -> Result<()>;
    fn placements(&self) -> Result<Vec<Placement>>;
    /// The ε ledger of a site's set releases (placement authority).
    fn save_site_budget(&self, budget: &Budget) -> Result<()>;
    fn site_budgets(&self) -> Result<Vec<Budget>>;
    /// Remembers that this node hosts `placement.twin_id` (to restart it after a crash).
    fn save_hosted(&self, placement: &Placement) -> Result<()>;
    fn remove_hosted(&self, twin: &TwinId) -> Result<()>;
    fn hosted(&self) -> Result<Vec<Placement>>;
    /// Keeps a kind learned over the fabric (a registration's Thing Model on the
    /// authority, a fetched one on other nodes), so a restarted node knows it.
    fn save_kind(&self, model: &KindModel) -> Result<()>;
    fn kinds(&self) -> Result<Vec<KindModel>>;
}

/// The gateway spool (DESIGN §7): durable seq numbering and frames not yet acknowledged.
pub trait SpoolStore: Durable {
    /// Reserves the next `count` sequence numbers of (twin, signal) durably and returns the
    /// first. Numbering survives restarts; a crash skips at most the unused reservation.
    fn reserve_seqs(&self, twin: &TwinId, signal: &str, count: u64) -> Result<u64>;
    /// Gives back the unused part of a reservation on clean shutdown: the next reservation
    /// of (twin, signal) starts at `next`.
    fn release_seqs(&self, twin: &TwinId, signal: &str, next: u64) -> Result<()>;
    fn spool_put(&self, frame: &TelemetryFrame) -> Result<()>;
    /// Removes every spooled frame of (twin, signal) with seq <= `upto`; returns how many.
    fn spool_truncate(&self, twin: &TwinId, signal: &str, upto: u64) -> Result<u64>;
    /// Up to `max` spooled frames of (twin, signal) with seq >= `from`, in seq order.
    fn spool_read(
        &self,
        twin: &TwinId,
        signal: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<TelemetryFrame>>;
    /// Lowest spooled seq of (twin, signal), if any.
    fn spool_first(&self, twin: &TwinId, signal: &str) -> Result<Option<u64>>;
    /// Highest spooled seq of (twin, signal), if any.
    fn spool_last(&self, twin: &TwinId, signal: &str) -> Result<Option<u64>>;
    fn spool_len(&self) -> u64;
}

/// The model registry of cloud nodes: every version of every model, by (id, version).
pub trait ModelStore: Durable {
    /// Stores `record` as `version` of `model_id` (replacing one stored there); durable
    /// when it returns (a registry acknowledges a version only once it is kept).
    fn put_model(&self, model_id: &str, version: u64, record: &ModelRecord) -> Result<()>;
    fn get_model(&self, model_id: &str, version: u64) -> Result<Option<ModelRecord>>;
    /// The highest stored version of `model_id`; 0 when there is none.
    fn newest_model_version(&self, model_id: &str) -> Result<u64>;
    /// Every stored record, by model id then version.
    fn models(&self) -> Result<Vec<ModelRecord>>;
}

/// A node's whole store: every concern above.
pub trait Store: SeriesStore + SnapshotStore + PlacementStore + SpoolStore + ModelStore {}

impl<T> Store for T where T: SeriesStore + SnapshotStore + PlacementStore + SpoolStore + ModelStore {}

/// Where time comes from (so simulations can run on virtual time).
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> i64;
}

/// Wall-clock time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0)
    }
}

/// Samples a device produced for one signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub signal: &'static str,
    pub start_ns: i64,
    pub sample_period_ns: i64,
    pub samples: Vec<f64>,
    /// Resolution of the samples (ADC LSB); 0 when unknown.
    pub scale: f64,
}

/// An identifier a device saw come or go (e.g. a MAC address associating with an access
/// point), on one of its kind's identifier streams.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub stream: &'static str,
    pub timestamp_ns: i64,
    pub identifier: String,
    pub present: bool,
}

/// Whether a gateway reaches a device behind a connection (broker, server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceStatus {
    Reachable,
    /// Down, with the reason (e.g. `connection refused by 127.0.0.1:1883`).
    Unreachable(String),
}

/// What became of a set-point handed to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetpointOutcome {
    Delivered,
    /// The device (or the gateway, checking the kind's range) refused it, saying why.
    Refused(String),
    /// The device could not be reached; the twin sends it again later.
    Unreachable(String),
}

/// A device behind an IoT gateway: real hardware, an MQTT bridge or a simulator.
///
/// Devices on a network run their I/O in their own tasks; the gateway calls these
/// methods from its actor, so none of them may block: `poll` drains what the I/O task
/// buffered, and a set-point that completes later is answered through
/// [`Device::setpoint_outcomes`].
pub trait Device: Send + Sync + 'static {
    fn twin_id(&self) -> &TwinId;
    fn kind(&self) -> twinmesh_twins::AssetKind;
    /// Everything the device measured up to `now_ns` since the last call.
    fn poll(&mut self, now_ns: i64) -> Vec<Block>;
    /// Identifiers seen since the last call (kinds with identifier streams).
    fn sightings(&mut self) -> Vec<Sighting> {
        Vec::new()
    }
    /// Hands a set-point to the device: `Some` when its outcome is known at once (a
    /// simulator), `None` when it completes later and comes back from
    /// [`Device::setpoint_outcomes`] with the same `ticket`.
    fn submit_setpoint(
        &mut self,
        ticket: u64,
        property: &str,
        value: f64,
    ) -> Option<SetpointOutcome>;
    /// Outcomes of set-points submitted earlier, by ticket, since the last call.
    fn setpoint_outcomes(&mut self) -> Vec<(u64, SetpointOutcome)> {
        Vec::new()
    }
    /// Whether the gateway reaches the device; `None` for devices that are always
    /// there (simulators).
    fn status(&self) -> Option<DeviceStatus> {
        None
    }
}

pub type SharedFabric = Arc<dyn Fabric>;
pub type SharedStore = Arc<dyn Store>;
pub type SharedClock = Arc<dyn Clock>;
