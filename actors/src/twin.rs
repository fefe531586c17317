//! `TwinActor`: one per asset. It ingests telemetry frames (dropping duplicates and
//! out-of-order frames by `seq`), keeps the twin's state, persists history and snapshots
//! through the `Store`, acknowledges frames only once they are durable, publishes state
//! and events through the `Fabric`, and answers the twin's RPCs.
//!
//! Three tasks feed the actor, all owned by the node's tracker and cancelled with it:
//! the *ingest pump* (subscription → validate → batch → apply → flush → ack), the *RPC
//! pump* (the twin's queryable) and the *control listener* (delivery reports).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use prost::Message;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use twinmesh_proto::encoding;
use twinmesh_twins::chain::{self, Analyzer, ChainSpec, WindowJob};
use twinmesh_twins::model::Model;
use twinmesh_twins::monitor::{Monitor, MonitorConfig};
use twinmesh_twins::proto::{
    self, twin_reply, twin_request, ChainUpdate, DesiredUpdate, FeatureSet, Placement,
    ReplayRequest, SetChainResponse, SetDesiredResponse, TelemetryFrame, TwinEvent, TwinReply,
    TwinRequest, TwinSnapshot, TwinSummary, Watermark,
};
use twinmesh_twins::state::{Admission, DeliveryStatus};
use twinmesh_twins::stats::Aggregation;
use twinmesh_twins::{frame, keys, privacy, td, AssetKind, Error as DomainError, TwinCore, TwinId};

use crate::context::NodeContext;
use crate::error::{Error, Result};
use twinmesh_twins::privacy::{Mechanism, Pseudonymiser};

use crate::metrics::NodeMetrics;
use crate::ports::{Qos, Sample, StoredFrame, Subscription, MAX_HISTORY_BUCKETS};

pub enum TwinMsg {
    /// Validated frames, in arrival order. Replies with the watermarks to acknowledge
    /// once the store has flushed.
    Ingest(Vec<TelemetryFrame>, RpcReplyPort<IngestAck>),
    /// A twin RPC (everything but history, which the RPC pump serves from the store).
    Request(TwinRequest, RpcReplyPort<TwinReply>),
    /// The gateway's answer to a set-point.
    DesiredOutcome(DesiredUpdate),
    /// Publish state if it changed / re-send pending set-points.
    Tick,
    /// The current state, for tests and admin.
    Inspect(RpcReplyPort<proto::Twin>),
    /// The features of one analysis window, computed off the actor.
    Features {
        signal: String,
        start_ns: i64,
        end_ns: i64,
        features: BTreeMap<String, f64>,
    },
    /// Identifiers a gateway saw come and go (checked against the policy here).
    Identifiers(proto::IdentifierBatch),
    /// Makes the actor fail (fault injection in tests: the supervisor must restart it).
    Fail(String),
    /// Charges (or refunds) the privacy ledger for a release computed off the actor;
    /// durable before the reply. Refused, charging nothing, when it does not fit.
    Charge(
        Charge,
        RpcReplyPort<std::result::Result<proto::Budget, proto::Error>>,
    ),
}

/// A ledger charge of one release.
pub struct Charge {
    pub epsilon: f64,
    pub delta: f64,
    pub refund: bool,
    /// The audit event (`privacy_release`) published once the charge is durable.
    pub audit: Option<(String, Vec<(&'static str, String)>)>,
}

/// What an ingest batch allows the pump to acknowledge after the next flush.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestAck {
    /// Placement epoch of the twin that applied the frames.
    pub epoch: u64,
    /// Last applied seq of each signal the batch touched.
    pub watermarks: Vec<(String, u64)>,
}

/// Why a request failed: the caller's mistake, or a passing state of the twin.
enum RequestError {
    Domain(DomainError),
    Unavailable(String),
}

impl From<DomainError> for RequestError {
    fn from(e: DomainError) -> Self {
        RequestError::Domain(e)
    }
}

/// Stop reason of a twin that went dormant (its node wakes it on demand).
pub const PASSIVATED: &str = "passivated";

/// Frames below the applied seq a new owner makes sure its history holds (the gateway's
/// default retention).
const REPLAY_WINDOW: u64 = 4096;
/// How often a twin checks its history for holes after it starts, and how many times.
const BACKFILL_CHECK: Duration = Duration::from_secs(2);
const BACKFILL_CHECKS: u32 = 30;

/// Points kept per process signal for analysis context.
const RECENT_POINTS: usize = 64;

/// What applying a batch of frames produced.
struct Applied {
    /// Last applied seq of each signal the batch touched.
    watermarks: Vec<(String, u64)>,
    /// Frames skipped because the gateway no longer held them.
    lost: u64,
    /// Analysis windows the batch completed.
    jobs: Vec<WindowJob>,
}

pub struct TwinArgs {
    pub ctx: Arc<NodeContext>,
    pub placement: Placement,
}

pub struct TwinActor;

pub struct TwinActorState {
    ctx: Arc<NodeContext>,
    core: TwinCore,
    placement: Placement,
    dirty: bool,
    last_state_publish: Option<Instant>,
    /// When the next armed tick fires (a nearer need arms another one; a tick re-arms
    /// whatever is still pending, so an extra one is harmless).
    tick_at: Option<Instant>,
    last_desired_send: Option<Instant>,
    /// Cuts incoming streams into the windows of the chain's edge stages.
    analyzer: Analyzer,
    /// Recent values of process (non-waveform) signals: the context of analysis windows
    /// (e.g. shaft speed averaged over a vibration window).
    recent: BTreeMap<String, std::collections::VecDeque<(i64, f64)>>,
    /// Frozen for a migration: frames are no longer applied nor acknowledged, and
    /// mutating requests are refused (the new owner takes over).
    frozen: bool,
    /// Last frame, request or delivery report (passivation).
    last_activity: Instant,
    /// History checks left after start, and when the next is due.
    backfill_checks: u32,
    backfill_due: Option<Instant>,
    /// Revision of the last snapshot replicated to the cloud, and when.
    replicated_revision: Option<u64>,
    last_replication: Option<Instant>,
    /// Scores feature windows with the installed anomaly model, if any.
    monitor: Option<Monitor>,
    /// Cancels this twin's tasks when it stops.
    cancel: CancellationToken,
}

impl TwinActorState {
    fn snapshot(&self) -> TwinSnapshot {
        TwinSnapshot {
            twin: Some(self.core.to_proto(Some(self.placement.clone()))),
            epoch: self.placement.epoch,
            saved_ns: self.ctx.now_ns(),
            node: self.ctx.node.to_string(),
        }
    }

    /// The snapshot as it may leave the site (cloud replicas, migration hand-over):
    /// protected values replaced by NaN, sequence numbers kept.
    fn offsite_snapshot(&self) -> TwinSnapshot {
        let mut snap = self.snapshot();
        if let Some(t) = snap.twin.as_mut() {
            self.core.policy.gate_snapshot_twin(t);
        }
        snap
    }

    /// The twin as `caller` may see it.
    fn twin_for(&self, caller: Option<&proto::Caller>) -> proto::Twin {
        let mut t = self.get_twin();
        if !privacy::sees_raw(caller, self.core.id.site()) {
            self.core.policy.gate_twin(&mut t);
        }
        t
    }

    fn summary(&self) -> TwinSummary {
        TwinSummary {
            twin_id: self.core.id.to_string(),
            kind: self.core.kind.to_string(),
            node: self.placement.node.clone(),
            tier: self.placement.tier.clone(),
            status: self.core.health.status.clone(),
            revision: self.core.revision,
        }
    }

    async fn publish(&self, key: String, payload: Vec<u8>, encoding: &'static str, qos: Qos) {
        let len = payload.len() as u64;
        match self
            .ctx
            .fabric
            .publish(&key, Bytes::from(payload), encoding, qos)
            .await
        {
            Ok(()) => {
                NodeMetrics::add(&self.ctx.metrics.frames_published, 1);
                NodeMetrics::add(&self.ctx.metrics.bytes_published, len);
            }
            Err(e) => tracing::warn!(twin = %self.core.id, key, "publish failed: {e}"),
        }
    }

    async fn publish_state(&mut self) {
        // Published state reaches every subscriber of the fabric, on the site or not.
        let state = proto::TwinState {
            twin: Some(self.twin_for(None)),
            timestamp_ns: self.ctx.now_ns(),
        };
        self.publish(
            keys::twin_state(&self.core.id),
            state.encode_to_vec(),
            encoding::TWIN_STATE,
            Qos::Latest,
        )
        .await;
        self.ctx.directory.upsert(&self.core.id, self.summary());
        self.dirty = false;
        self.last_state_publish = Some(Instant::now());
    }

    async fn publish_event(&self, kind: &str, message: String, attributes: Vec<(&str, String)>) {
        let event = TwinEvent {
            twin_id: self.core.id.to_string(),
            kind: kind.to_owned(),
            timestamp_ns: self.ctx.now_ns(),
            message,
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            epoch: self.placement.epoch,
        };
        self.publish(
            keys::twin_events(&self.core.id),
            event.encode_to_vec(),
            encoding::TWIN_EVENT,
            Qos::Reliable,
        )
        .await;
    }

    /// An identifier batch: refused whole when it is not in the form the policy demands
    /// (pseudonyms, when the stream is pseudonymised; nothing, when it is suppressed),
    /// else published as a `device_associations`-style event of who came and went.
    async fn on_identifiers(&mut self, batch: proto::IdentifierBatch) {
        let mechanism = self.core.policy.identifier(&batch.stream);
        let refused = match mechanism {
            Mechanism::None => None,
            Mechanism::Pseudonymise => batch
                .records
                .iter()
                .any(|r| !Pseudonymiser::is_pseudonym(&r.identifier))
                .then_some("an identifier that is not a pseudonym"),
            _ => Some("a suppressed stream"),
        };
        if let Some(why) = refused {
            NodeMetrics::add(
                &self.ctx.metrics.identifiers_rejected,
                batch.records.len() as u64,
            );
            tracing::warn!(twin = %self.core.id, stream = batch.stream, records = batch.records.len(), "identifier batch refused: {why}");
            return;
        }
        let join = |present: bool| {
            batch
                .records
                .iter()
                .filter(|r| r.present == present)
                .map(|r| r.identifier.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (came, left) = (join(true), join(false));
        let n_came = batch.records.iter().filter(|r| r.present).count();
        let first = batch
            .records
            .iter()
            .map(|r| r.timestamp_ns)
            .min()
            .unwrap_or(0);
        let last = batch
            .records
            .iter()
            .map(|r| r.timestamp_ns)
            .max()
            .unwrap_or(0);
        self.publish_event(
            &batch.stream,
            format!(
                "{n_came} came, {} left ({})",
                batch.records.len() - n_came,
                if mechanism == Mechanism::None {
                    "raw"
                } else {
                    "pseudonymised"
                }
            ),
            vec![
                ("stream", batch.stream.clone()),
                ("mechanism", mechanism.as_str().to_owned()),
                ("present", came),
                ("left", left),
                ("first_ns", first.to_string()),
                ("last_ns", last.to_string()),
            ],
        )
        .await;
    }

    async fn send_pending_desired(&mut self) {
        let updates: Vec<DesiredUpdate> = self
            .core
            .pending_desired()
            .map(|(property, d)| DesiredUpdate {
                twin_id: self.core.id.to_string(),
                property: property.to_owned(),
                value: d.value,
                revision: d.revision,
                epoch: self.placement.epoch,
                status: proto::DeliveryStatus::Pending as i32,
                timestamp_ns: d.updated_ns,
                reason: String::new(),
            })
            .collect();
        for update in &updates {
            self.publish(
                keys::control(&self.core.id),
                update.encode_to_vec(),
                encoding::DESIRED_UPDATE,
                Qos::Reliable,
            )
            .await;
        }
        if !updates.is_empty() {
            self.last_desired_send = Some(Instant::now());
        }
    }

    /// Publishes state now if the last publication is old enough, else arms one tick;
    /// likewise replicates the snapshot to the cloud.
    async fn state_changed(&mut self, myself: &ActorRef<TwinMsg>) {
        self.dirty = true;
        let interval = self.ctx.twin_config.state_interval;
        match self.last_state_publish {
            Some(t) if t.elapsed() < interval => self.arm_tick(myself, interval - t.elapsed()),
            _ => self.publish_state().await,
        }
        if let Some(wait) = self.maybe_replicate().await {
            self.arm_tick(myself, wait);
        }
    }

    fn arm_tick(&mut self, myself: &ActorRef<TwinMsg>, after: Duration) {
        let at = Instant::now() + after;
        if self.tick_at.is_none_or(|t| at < t) {
            self.tick_at = Some(at);
            myself.send_after(after, || TwinMsg::Tick);
        }
    }

    fn persist(&self) -> Result<()> {
        self.ctx.store.save_snapshot(&self.snapshot())
    }

    /// Persists the snapshot and flushes: durable on this node before the caller hears.
    async fn persist_durably(&self) -> Result<()> {
        self.persist()?;
        self.ctx.store.flush().await
    }

    fn apply_frames(&mut self, frames: Vec<TelemetryFrame>) -> Result<Applied> {
        let mut stored = Vec::with_capacity(frames.len());
        let mut jobs = Vec::new();
        let mut touched: Vec<String> = Vec::new();
        let mut lost_total = 0;
        for f in frames {
            if !touched.contains(&f.signal) {
                touched.push(f.signal.clone());
            }
            match self.core.admit(&f.signal, f.seq, f.spool_base_seq) {
                Admission::Apply { lost } => {
                    self.core.apply_frame(
                        &f.signal,
                        f.seq,
                        f.start_ns,
                        f.sample_period_ns,
                        &f.samples,
                        lost,
                    );
                    lost_total += lost;
                    NodeMetrics::add(&self.ctx.metrics.samples_in, f.samples.len() as u64);
                    if self
                        .core
                        .kind
                        .schema()
                        .signal(&f.signal)
                        .is_ok_and(|s| !s.waveform)
                    {
                        let recent = self.recent.entry(f.signal.clone()).or_default();
                        for (i, v) in f.samples.iter().enumerate() {
                            recent.push_back((f.start_ns + i as i64 * f.sample_period_ns, *v));
                        }
                        while recent.len() > RECENT_POINTS {
                            recent.pop_front();
                        }
                    }
                    if self.ctx.twin_config.analysis && self.analyzer.wants(&f.signal) {
                        let block = chain::Block {
                            start_ns: f.start_ns,
                            period_ns: f.sample_period_ns,
                            samples: f.samples.clone(),
                        };
                        jobs.extend(self.analyzer.push(&f.signal, block));
                    }
                    stored.push(StoredFrame {
                        signal: f.signal,
                        seq: f.seq,
                        start_ns: f.start_ns,
                        sample_period_ns: f.sample_period_ns,
                        samples: f.samples,
                        scale: f.scale,
                    });
                }
                Admission::Duplicate => {
                    // Already applied to the state; a replay after a move still fills this
                    // node's history (same key: storing it again changes nothing).
                    NodeMetrics::add(&self.ctx.metrics.frames_duplicate, 1);
                    stored.push(StoredFrame {
                        signal: f.signal,
                        seq: f.seq,
                        start_ns: f.start_ns,
                        sample_period_ns: f.sample_period_ns,
                        samples: f.samples,
                        scale: f.scale,
                    });
                }
                Admission::Gap { .. } => {
                    NodeMetrics::add(&self.ctx.metrics.frames_gap, 1);
                }
            }
        }
        if !stored.is_empty() {
            self.ctx.store.append_frames(&self.core.id, &stored)?;
            self.persist()?;
        }
        let acks = touched
            .into_iter()
            .map(|s| {
                let seq = self.core.last_seq(&s);
                (s, seq)
            })
            .collect();
        for job in &mut jobs {
            job.context = self
                .core
                .reported
                .iter()
                .map(|(k, r)| {
                    let v = self
                        .recent
                        .get(k)
                        .and_then(|pts| {
                            let pts: Vec<(i64, f64)> = pts.iter().copied().collect();
                            chain::hold_average(&pts, job.start_ns, job.end_ns)
                        })
                        .unwrap_or(r.value);
                    (k.clone(), v)
                })
                .collect();
        }
        Ok(Applied {
            watermarks: acks,
            lost: lost_total,
            jobs,
        })
    }

    /// Runs analysis windows on the blocking pool (bounded per node); each result comes
    /// back to the actor as `TwinMsg::Features`.
    fn analyse(&self, myself: &ActorRef<TwinMsg>, jobs: Vec<WindowJob>) {
        for job in jobs {
            let me = myself.clone();
            let permits = self.ctx.analysis_permits.clone();
            let cancel = self.cancel.clone();
            self.ctx.tasks.spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                if cancel.is_cancelled() {
                    return;
                }
                let (signal, start_ns, end_ns) = (job.signal.clone(), job.start_ns, job.end_ns);
                if let Ok(features) =
                    tokio::task::spawn_blocking(move || chain::run_window(&job)).await
                {
                    let _ = me.cast(TwinMsg::Features {
                        signal,
                        start_ns,
                        end_ns,
                        features,
                    });
                }
            });
        }
    }

    async fn on_features(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        signal: String,
        start_ns: i64,
        end_ns: i64,
        features: BTreeMap<String, f64>,
    ) -> Result<()> {
        if features.is_empty() {
            return Ok(());
        }
        self.core.apply_features(&features);
        self.score(&features, end_ns).await;
        // Feature history at the edge: one point per feature per window.
        let points: Vec<StoredFrame> = features
            .iter()
            .map(|(name, v)| StoredFrame {
                signal: name.clone(),
                seq: 0,
                start_ns: end_ns,
                sample_period_ns: end_ns.saturating_sub(start_ns).max(1),
                samples: vec![*v],
                scale: 0.0,
            })
            .collect();
        self.ctx.store.append_frames(&self.core.id, &points)?;
        self.persist()?;
        // Features of protected signals stay in the site's own history.
        let mut features = features;
        self.core.policy.gate_features(&mut features);
        if features.is_empty() {
            self.state_changed(myself).await;
            return Ok(());
        }
        let set = FeatureSet {
            twin_id: self.core.id.to_string(),
            signal,
            window_start_ns: start_ns,
            window_end_ns: end_ns,
            features: features.into_iter().collect(),
            epoch: self.placement.epoch,
            archive: self.core.chain.archives(),
        };
        self.publish(
            keys::twin_features(&self.core.id),
            set.encode_to_vec(),
            encoding::FEATURE_SET,
            Qos::Reliable,
        )
        .await;
        self.state_changed(myself).await;
        Ok(())
    }

    /// Replicates the snapshot to the cloud (placement authority), which keeps the newest
    /// per twin and refuses older epochs.
    async fn replicate(&mut self) {
        let snap = self.offsite_snapshot();
        let revision = self.core.revision;
        self.publish(
            keys::snapshot(&self.core.id),
            snap.encode_to_vec(),
            encoding::TWIN_SNAPSHOT,
            Qos::Reliable,
        )
        .await;
        self.replicated_revision = Some(revision);
        self.last_replication = Some(Instant::now());
    }

    /// Replicates now and waits (up to 2 s) until the cloud's replica holds this
    /// revision: a failover must not start from a replica older than a ledger charge.
    async fn replicate_confirmed(&mut self) -> bool {
        self.replicate().await;
        let want = (self.placement.epoch, self.core.revision);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Some(s) = fetch_replica(&self.ctx, &self.core.id).await {
                if (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision)) >= want {
                    return true;
                }
            }
            // The replica usually lands within a millisecond or two on a LAN.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    }

    /// Replicates when the state changed and the last replication is old enough;
    /// returns how long until the next one is due, if one is pending.
    async fn maybe_replicate(&mut self) -> Option<Duration> {
        if self.replicated_revision == Some(self.core.revision) || self.frozen {
            return None;
        }
        let interval = self.ctx.twin_config.snapshot_interval;
        match self.last_replication {
            Some(t) if t.elapsed() < interval => Some(interval - t.elapsed()),
            _ => {
                self.replicate().await;
                None
            }
        }
    }

    /// Where this node's history of `signal` needs frames from: the first seq missing in
    /// the replay window below the applied one, or past the newest stored frame.
    fn history_needs(&self, signal: &str) -> Option<u64> {
        let last = self.core.last_seq(signal);
        let from = last.saturating_sub(REPLAY_WINDOW - 1).max(1);
        match self
            .ctx
            .store
            .first_missing_seq(&self.core.id, signal, from, last)
        {
            Ok(Some(missing)) => Some(missing),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(twin = %self.core.id, signal, "history not readable: {e}");
                None
            }
        }
    }

    /// Asks the gateway to re-send what this node's history lacks (after a restart, a
    /// migration or a failover): per signal, everything from the first missing seq of
    /// the replay window, or past the newest frame stored. Returns whether any signal
    /// had a hole below the applied seq (the request may need repeating).
    async fn request_replay(&self) -> bool {
        let mut holes = false;
        let have_upto = self
            .core
            .kind
            .schema()
            .signals
            .iter()
            .map(|s| {
                let have = match self.history_needs(s.name) {
                    Some(missing) => {
                        holes = true;
                        missing - 1
                    }
                    None => self
                        .ctx
                        .store
                        .last_stored_seq(&self.core.id, s.name)
                        .unwrap_or(0),
                };
                (s.name.to_owned(), have)
            })
            .collect();
        let req = ReplayRequest {
            twin_id: self.core.id.to_string(),
            epoch: self.placement.epoch,
            have_upto,
        };
        self.publish(
            keys::replay(&self.core.id),
            req.encode_to_vec(),
            encoding::REPLAY_REQUEST,
            Qos::Reliable,
        )
        .await;
        holes
    }

    /// Repeats the replay request while this node's history has holes (the request or
    /// some frames may have been lost), a bounded number of times.
    async fn check_backfill(&mut self, myself: &ActorRef<TwinMsg>) {
        if self.backfill_checks == 0 || self.frozen {
            return;
        }
        self.backfill_checks -= 1;
        if self.request_replay().await {
            self.backfill_due = Some(Instant::now() + BACKFILL_CHECK);
            self.arm_tick(myself, BACKFILL_CHECK);
        } else {
            self.backfill_checks = 0;
            self.backfill_due = None;
        }
    }

    /// How long this twin may stay idle before it is passivated, if ever: only on edge
    /// nodes, whose router wakes dormant twins.
    fn passivate_after(&self) -> Option<Duration> {
        self.ctx
            .twin_config
            .passivate_after
            .filter(|_| self.ctx.router.is_active())
    }

    /// Nothing in flight that a stopped twin would lose.
    fn can_passivate(&self) -> bool {
        !self.frozen && self.core.pending_desired().next().is_none() && self.backfill_due.is_none()
    }

    /// Snapshots (durably, and to the cloud) and stops; the node keeps the twin
    /// registered and wakes it on its next frame or call.
    async fn passivate(&mut self, myself: &ActorRef<TwinMsg>) -> Result<()> {
        self.persist()?;
        self.ctx.store.flush().await?;
        self.replicate().await;
        self.publish_event(
            "passivated",
            format!(
                "idle for {} s: stopped until its next frame or call",
                self.last_activity.elapsed().as_secs()
            ),
            vec![],
        )
        .await;
        myself.stop(Some(PASSIVATED.to_owned()));
        Ok(())
    }

    async fn publish_chain(&self) {
        let update = ChainUpdate {
            twin_id: self.core.id.to_string(),
            chain: Some((&self.core.chain.spec).into()),
            revision: self.core.revision,
            sealed_signals: self.core.policy.protected_signals(),
            identifier_mechanisms: self.core.policy.identifier_mechanisms(),
        };
        self.publish(
            keys::chain(&self.core.id),
            update.encode_to_vec(),
            encoding::CHAIN_UPDATE,
            Qos::Reliable,
        )
        .await;
    }

    /// After a start: the model the snapshot names, from this node's store or else
    /// (a twin that moved here) from the cloud's registry.
    async fn restore_model(&mut self) {
        let (id, version) = (
            self.core.health.model_id.clone(),
            self.core.health.model_version,
        );
        if id.is_empty() {
            return;
        }
        let local = match self.ctx.store.load_twin_model(&self.core.id) {
            Ok(r) => r.filter(|r| {
                r.info
                    .as_ref()
                    .is_some_and(|i| i.model_id == id && i.version == version)
            }),
            Err(e) => {
                tracing::warn!(twin = %self.core.id, "stored model unreadable: {e}");
                None
            }
        };
        let record = match local {
            Some(r) => Some(r),
            None => fetch_model(&self.ctx, &id, version).await,
        };
        let checked = record.map(|r| {
            let m = self.check_model(&r);
            (r, m)
        });
        match checked {
            Some((r, Ok(model))) => {
                if let Err(e) = self.ctx.store.save_twin_model(&self.core.id, &r) {
                    tracing::warn!(twin = %self.core.id, "model not stored: {e}");
                }
                let (score, status) = (
                    self.core.health.anomaly_score,
                    self.core.health.status.clone(),
                );
                self.install(&r, model);
                // The last assessment stands until the next window.
                self.core.health.anomaly_score = score;
                self.core.health.status = status;
            }
            Some((_, Err(e))) => {
                tracing::error!(twin = %self.core.id, model = %id, version, "model unusable: {e}");
            }
            None => {
                tracing::warn!(twin = %self.core.id, model = %id, version,
                    "model not found here nor in the registry; scoring paused");
            }
        }
    }

    /// `model_id vN`, or `no model`.
    fn model_label(&self) -> String {
        let h = &self.core.health;
        if h.model_id.is_empty() {
            "no model".to_owned()
        } else {
            format!("{} v{}", h.model_id, h.model_version)
        }
    }

    /// Reads a model record and checks it against the twin's kind.
    fn check_model(&self, record: &proto::ModelRecord) -> std::result::Result<Model, String> {
        let info = record.info.clone().unwrap_or_default();
        twinmesh_twins::model::validate_model_id(&info.model_id).map_err(|e| e.to_string())?;
        let model = Model::from_bytes(&record.model).map_err(|e| e.to_string())?;
        model
            .check_kind(self.core.kind)
            .map_err(|e| e.to_string())?;
        Ok(model)
    }

    /// Swaps the model in: scoring starts afresh (status ok until windows say otherwise).
    fn install(&mut self, record: &proto::ModelRecord, model: Model) {
        let info = record.info.clone().unwrap_or_default();
        self.monitor = Some(Monitor::new(Arc::new(model), MonitorConfig::default()));
        let h = &mut self.core.health;
        h.model_id = info.model_id;
        h.model_version = info.version;
        h.anomaly_score = 0.0;
        h.status = "ok".to_owned();
    }

    /// Scores a window's features with the installed model; raises `alarm` and
    /// `model_quality` events.
    async fn score(&mut self, features: &BTreeMap<String, f64>, end_ns: i64) {
        let Some(monitor) = self.monitor.as_mut() else {
            return;
        };
        let Some(a) = monitor.observe(features) else {
            return;
        };
        let threshold = monitor.model().threshold;
        NodeMetrics::add(&self.ctx.metrics.windows_scored, 1);
        let h = &mut self.core.health;
        h.anomaly_score = a.score;
        if h.status != a.status.as_str() {
            h.status = a.status.as_str().to_owned();
        }
        if a.raised.is_none() && a.drifted.is_none() {
            return;
        }
        let label = self.model_label();
        if let Some(parts) = a.raised {
            NodeMetrics::add(&self.ctx.metrics.alarms_raised, 1);
            let top: Vec<String> = parts
                .iter()
                .take(3)
                .map(|(f, share)| format!("{f}={share:.2}"))
                .collect();
            self.core.health.last_alarm = format!(
                "{end_ns}: score {:.3} > {threshold:.3}; {}",
                a.score,
                top.join(", ")
            );
            self.publish_event(
                "alarm",
                format!(
                    "anomaly score {:.3} above the threshold {threshold:.3} of {label}; most from {}",
                    a.score,
                    top.join(", ")
                ),
                vec![
                    ("score", a.score.to_string()),
                    ("threshold", threshold.to_string()),
                    ("features", top.join(",")),
                    ("window_end_ns", end_ns.to_string()),
                ],
            )
            .await;
        }
        if let Some(p) = a.drifted {
            self.publish_event(
                "model_quality",
                format!(
                    "scores of {label} drifted from its training distribution (PSI {p:.3}); retraining advised"
                ),
                vec![
                    ("psi", p.to_string()),
                    ("model_id", self.core.health.model_id.clone()),
                    ("model_version", self.core.health.model_version.to_string()),
                ],
            )
            .await;
        }
    }

    /// Checks and charges (or refunds) the ledger, durably, then publishes the audit
    /// event. Nothing is charged when the release does not fit the budget.
    async fn charge(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        c: Charge,
    ) -> std::result::Result<proto::Budget, proto::Error> {
        let now = self.ctx.now_ns();
        let before = self.core.ledger;
        self.core.ledger.roll(&self.core.policy, now);
        if c.refund {
            self.core.ledger.refund(c.epsilon, c.delta);
        } else {
            if let Err(e) =
                self.core
                    .ledger
                    .check(&self.core.id.to_string(), &self.core.policy, c.epsilon)
            {
                self.core.ledger = before;
                return Err((&e).into());
            }
            self.core.ledger.charge(c.epsilon, c.delta);
        }
        self.core.revision += 1;
        if let Err(e) = self.persist_durably().await {
            self.core.ledger = before;
            return Err(proto::Error {
                code: proto::ErrorCode::Unavailable as i32,
                message: format!("privacy ledger of {} not stored: {e}", self.core.id),
            });
        }
        // A failover starts from the cloud's replica: it must hold this charge, or the
        // new owner could spend the same budget again.
        if !self.replicate_confirmed().await {
            tracing::warn!(
                twin = %self.core.id,
                "privacy ledger charged, but the cloud did not confirm its replica (unreachable?): a failover now would start from an older ledger"
            );
        }
        let id = self.core.id.to_string();
        let budget = self.core.ledger.to_proto(&id, &self.core.policy);
        if let Some((message, mut attributes)) = c.audit {
            attributes.push((
                "epsilon_remaining",
                (budget.epsilon_total - budget.epsilon_spent)
                    .max(0.0)
                    .to_string(),
            ));
            self.publish_event("privacy_release", message, attributes)
                .await;
        }
        self.state_changed(myself).await;
        Ok(budget)
    }

    fn get_twin(&self) -> proto::Twin {
        self.core.to_proto(Some(self.placement.clone()))
    }

    fn check_twin_id(&self, twin_id: &str) -> Result<(), DomainError> {
        if twin_id == self.core.id.to_string() {
            Ok(())
        } else {
            Err(DomainError::UnknownTwin(twin_id.to_owned()))
        }
    }

    async fn handle_request(
        &mut self,
        myself: &ActorRef<TwinMsg>,
        req: TwinRequest,
    ) -> std::result::Result<twin_reply::Reply, RequestError> {
        let mutating = matches!(
            req.request,
            Some(twin_request::Request::SetDesired(_))
                | Some(twin_request::Request::SetChain(_))
                | Some(twin_request::Request::InstallModel(_))
                | Some(twin_request::Request::SetPolicy(_))
        );
        if self.frozen && mutating {
            return Err(RequestError::Unavailable(format!(
                "twin {} is moving",
                self.core.id
            )));
        }
        let caller = req.caller;
        match req.request {
            Some(twin_request::Request::Freeze(r)) => {
                self.check_twin_id(&r.twin_id)?;
                if r.epoch != self.placement.epoch {
                    return Err(RequestError::Domain(DomainError::InvalidArgument(format!(
                        "freeze of {} at epoch {}, twin is at epoch {}",
                        self.core.id, r.epoch, self.placement.epoch
                    ))));
                }
                if r.release {
                    self.frozen = false;
                    return Ok(twin_reply::Reply::Snapshot(self.offsite_snapshot()));
                }
                self.frozen = true;
                // No flush here: the snapshot travels to the cloud, and anything after an
                // older durable one is still in the gateway's retained spool.
                self.persist()
                    .map_err(|e| RequestError::Unavailable(format!("snapshot not stored: {e}")))?;
                self.replicate().await;
                Ok(twin_reply::Reply::Snapshot(self.offsite_snapshot()))
            }
            Some(twin_request::Request::GetTwin(r)) => {
                self.check_twin_id(&r.twin_id)?;
                Ok(twin_reply::Reply::Twin(self.twin_for(caller.as_ref())))
            }
            Some(twin_request::Request::GetPolicy(r)) => {
                self.check_twin_id(&r.twin_id)?;
                Ok(twin_reply::Reply::Policy(
                    self.core.policy.to_proto(&r.twin_id),
                ))
            }
            Some(twin_request::Request::GetBudget(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let now = self.ctx.now_ns();
                let mut ledger = self.core.ledger;
                ledger.roll(&self.core.policy, now);
                Ok(twin_reply::Reply::Budget(
                    ledger.to_proto(&r.twin_id, &self.core.policy),
                ))
            }
            Some(twin_request::Request::SetPolicy(r)) => {
                let p = r.policy.unwrap_or_default();
                self.check_twin_id(&p.twin_id)?;
                if privacy::role_of(caller.as_ref()) < privacy::Role::DataOwner {
                    return Err(RequestError::Domain(DomainError::PermissionDenied(
                        "setting a privacy policy needs the data_owner role".to_owned(),
                    )));
                }
                if let Some(expected) = r.expected_version {
                    if expected != self.core.policy.version {
                        return Err(RequestError::Domain(DomainError::PolicyVersionMismatch {
                            twin: self.core.id.to_string(),
                            expected,
                            actual: self.core.policy.version,
                        }));
                    }
                }
                let mut policy = privacy::Policy::validate(&p, self.core.kind)?;
                policy.version = self.core.policy.version + 1;
                let previous = std::mem::replace(&mut self.core.policy, policy);
                self.core.revision += 1;
                if let Err(e) = self.persist_durably().await {
                    self.core.policy = previous;
                    return Err(RequestError::Unavailable(format!("policy not stored: {e}")));
                }
                // Like a ledger charge: a failover must not bring back the older policy.
                if !self.replicate_confirmed().await {
                    tracing::warn!(twin = %self.core.id, "policy stored, but the cloud did not confirm its replica (unreachable?)");
                }
                // The gateway seals what the new policy protects.
                self.publish_chain().await;
                let protected = self.core.policy.protected_signals().join(",");
                self.publish_event(
                    "policy_changed",
                    format!(
                        "privacy policy v{} (protected: {protected})",
                        self.core.policy.version
                    ),
                    vec![
                        ("version", self.core.policy.version.to_string()),
                        ("protected", protected.clone()),
                        ("by", caller.map(|c| c.subject).unwrap_or_default()),
                    ],
                )
                .await;
                self.state_changed(myself).await;
                Ok(twin_reply::Reply::Policy(
                    self.core.policy.to_proto(&p.twin_id),
                ))
            }
            Some(twin_request::Request::ThingDescription(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let json = td::thing_description(&self.core.id, self.core.kind).to_string();
                Ok(twin_reply::Reply::ThingDescription(
                    proto::ThingDescription {
                        twin_id: r.twin_id,
                        json,
                    },
                ))
            }
            Some(twin_request::Request::SetDesired(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let now = self.ctx.now_ns();
                let desired: proto::DesiredValue = self
                    .core
                    .set_desired(&r.property, r.value, r.expected_revision, now)?
                    .into();
                if let Err(e) = self.persist() {
                    return Err(RequestError::Unavailable(format!(
                        "set-point not stored: {e}"
                    )));
                }
                self.send_pending_desired().await;
                self.state_changed(myself).await;
                self.arm_tick(myself, self.ctx.twin_config.desired_retry);
                Ok(twin_reply::Reply::SetDesired(SetDesiredResponse {
                    revision: self.core.revision,
                    desired: Some(desired),
                }))
            }
            Some(twin_request::Request::SetChain(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let spec = ChainSpec::from(&r.chain.unwrap_or_default());
                let chain = self
                    .core
                    .set_chain(&spec, r.expected_revision)?
                    .spec
                    .clone();
                self.analyzer = Analyzer::new(&self.core.chain);
                if let Err(e) = self.persist() {
                    return Err(RequestError::Unavailable(format!("chain not stored: {e}")));
                }
                self.publish_chain().await;
                self.publish_event(
                    "chain_changed",
                    format!("processing chain replaced ({} stages)", chain.stage.len()),
                    vec![("stages", chain.stage.len().to_string())],
                )
                .await;
                self.state_changed(myself).await;
                Ok(twin_reply::Reply::SetChain(SetChainResponse {
                    revision: self.core.revision,
                    chain: Some((&chain).into()),
                }))
            }
            Some(twin_request::Request::InstallModel(r)) => {
                self.check_twin_id(&r.twin_id)?;
                let record = proto::ModelRecord {
                    info: Some(proto::ModelInfo {
                        model_id: r.model_id,
                        version: r.version,
                        ..Default::default()
                    }),
                    model: r.model,
                };
                let previous = self.model_label();
                let model = self.check_model(&record).map_err(|e| {
                    RequestError::Domain(DomainError::InvalidArgument(format!(
                        "model rejected: {e}; the twin keeps {previous}"
                    )))
                })?;
                self.ctx
                    .store
                    .save_twin_model(&self.core.id, &record)
                    .map_err(|e| RequestError::Unavailable(format!("model not stored: {e}")))?;
                self.install(&record, model);
                self.core.revision += 1;
                if let Err(e) = self.persist() {
                    return Err(RequestError::Unavailable(format!("model not stored: {e}")));
                }
                if let Err(e) = self.ctx.store.flush().await {
                    return Err(RequestError::Unavailable(format!(
                        "model not made durable: {e}"
                    )));
                }
                let label = self.model_label();
                self.publish_event(
                    "model_installed",
                    format!("anomaly model {label} installed (was {previous})"),
                    vec![
                        ("model_id", self.core.health.model_id.clone()),
                        ("model_version", self.core.health.model_version.to_string()),
                    ],
                )
                .await;
                self.state_changed(myself).await;
                Ok(twin_reply::Reply::InstallModel(
                    proto::InstallModelResponse {
                        health: Some(self.get_twin().health.unwrap_or_default()),
                    },
                ))
            }
            Some(twin_request::Request::QueryHistory(_))
            | Some(twin_request::Request::ImportHistory(_))
            | Some(twin_request::Request::Release(_))
            | Some(twin_request::Request::Contribute(_)) => Err(RequestError::Domain(
                DomainError::InvalidArgument("served by the rpc pump".to_owned()),
            )),
            None => Err(RequestError::Domain(DomainError::InvalidArgument(
                "empty twin request".to_owned(),
            ))),
        }
    }
}

impl Actor for TwinActor {
    type Msg = TwinMsg;
    type State = TwinActorState;
    type Arguments = TwinArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: TwinArgs,
    ) -> std::result::Result<Self::State, ActorProcessingErr> {
        let TwinArgs { ctx, placement } = args;
        let id: TwinId = placement.twin_id.parse()?;
        let kind: AssetKind = placement.kind.parse()?;
        // The newest snapshot, by (epoch, revision): this node's own, or — when the twin
        // comes here from another node (failover, migration) — the one replicated to the
        // cloud.
        let local = ctx.store.load_snapshot(&id)?;
        let remote = if local.as_ref().is_none_or(|s| s.epoch < placement.epoch) {
            fetch_replica(&ctx, &id).await
        } else {
            None
        };
        let rank = |s: &TwinSnapshot| (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision));
        let best = [local, remote]
            .into_iter()
            .flatten()
            .max_by_key(|s| rank(s));
        let (core, restored) = match best.and_then(|s| s.twin).map(TwinCore::try_from) {
            Some(Ok(core)) => (core, true),
            Some(Err(e)) => {
                tracing::error!(twin = %id, "stored snapshot is unreadable ({e}); starting empty");
                (TwinCore::new(id.clone(), kind), false)
            }
            None => (TwinCore::new(id.clone(), kind), false),
        };
        let mut core = core;
        if !restored {
            // A new twin starts with the chain its gateway was configured with, if any.
            if let Some(spec) = placement
                .initial_chain
                .as_ref()
                .filter(|c| !c.stages.is_empty())
            {
                match chain::Chain::validate(&ChainSpec::from(spec), kind) {
                    Ok(c) => core.chain = c,
                    Err(e) => tracing::warn!(twin = %id, "ignoring invalid initial chain: {e}"),
                }
            }
        }
        let cancel = ctx.cancel.child_token();
        let analyzer = Analyzer::new(&core.chain);
        let state = TwinActorState {
            ctx: ctx.clone(),
            analyzer,
            recent: BTreeMap::new(),
            frozen: false,
            last_activity: Instant::now(),
            backfill_checks: BACKFILL_CHECKS,
            backfill_due: None,
            replicated_revision: None,
            last_replication: None,
            core,
            placement,
            dirty: true,
            last_state_publish: None,
            tick_at: None,
            last_desired_send: None,
            monitor: None,
            cancel: cancel.clone(),
        };
        let mut state = state;
        state.restore_model().await;
        state.persist()?;

        // Declare the fabric side before the actor counts as started, so a twin that is
        // up is reachable.
        let (telemetry, rpc, delivered) = if ctx.router.is_active() {
            // Edge: the node's router hands this twin its frames, calls and reports.
            let r = ctx.router.register(&id, ctx.twin_config.ingest_queue);
            (r.telemetry, r.rpc, r.delivered)
        } else {
            let telemetry = ctx
                .fabric
                .subscribe(&keys::telemetry_of(&id), ctx.twin_config.ingest_queue)
                .await?;
            let rpc = ctx
                .fabric
                .queryable(&keys::twin_rpc(&id), ctx.twin_config.ingest_queue)
                .await?;
            let delivered = ctx
                .fabric
                .subscribe(&keys::control_delivered(&id), 64)
                .await?;
            (telemetry, rpc, delivered)
        };

        ctx.tasks.spawn(ingest_pump(
            myself.clone(),
            ctx.clone(),
            id.clone(),
            kind,
            telemetry,
            cancel.clone(),
        ));
        ctx.tasks.spawn(rpc_pump(
            myself.clone(),
            ctx.clone(),
            id.clone(),
            kind,
            rpc,
            cancel.clone(),
        ));
        ctx.tasks
            .spawn(control_listener(myself.clone(), delivered, cancel.clone()));
        tracing::debug!(twin = %id, restored, epoch = state.placement.epoch, "twin started");
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        state.publish_state().await;
        state.publish_chain().await;
        state.check_backfill(&myself).await;
        state
            .publish_event(
                "started",
                format!("twin started on {}", state.ctx.node),
                vec![
                    ("node", state.ctx.node.to_string()),
                    ("revision", state.core.revision.to_string()),
                ],
            )
            .await;
        if state.core.pending_desired().next().is_some() {
            state.send_pending_desired().await;
            state.arm_tick(&myself, state.ctx.twin_config.desired_retry);
        }
        if let Some(idle) = state.passivate_after() {
            state.arm_tick(&myself, idle);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        state.cancel.cancel();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> std::result::Result<(), ActorProcessingErr> {
        if matches!(
            msg,
            TwinMsg::Ingest(..) | TwinMsg::Request(..) | TwinMsg::DesiredOutcome(_)
        ) {
            state.last_activity = Instant::now();
            if let Some(idle) = state.passivate_after() {
                state.arm_tick(&myself, idle);
            }
        }
        match msg {
            TwinMsg::Ingest(_, reply) if state.frozen => {
                // Moving: the new owner applies these (the gateway re-sends them).
                let _ = reply.send(IngestAck {
                    epoch: state.placement.epoch,
                    watermarks: Vec::new(),
                });
            }
            TwinMsg::Ingest(frames, reply) => {
                let Applied {
                    watermarks,
                    lost,
                    jobs,
                } = state.apply_frames(frames)?;
                state.analyse(&myself, jobs);
                let _ = reply.send(IngestAck {
                    epoch: state.placement.epoch,
                    watermarks,
                });
                if lost > 0 {
                    state
                        .publish_event(
                            "frames_lost",
                            format!("{lost} frames could no longer be resent by the gateway"),
                            vec![("frames", lost.to_string())],
                        )
                        .await;
                }
                state.state_changed(&myself).await;
            }
            TwinMsg::Request(req, reply) => {
                let out = match state.handle_request(&myself, req).await {
                    Ok(r) => r,
                    Err(RequestError::Domain(e)) => twin_reply::Reply::Error((&e).into()),
                    Err(RequestError::Unavailable(message)) => {
                        twin_reply::Reply::Error(proto::Error {
                            code: proto::ErrorCode::Unavailable as i32,
                            message,
                        })
                    }
                };
                let _ = reply.send(self::reply(out));
            }
            TwinMsg::DesiredOutcome(update) => {
                let status = proto::DeliveryStatus::try_from(update.status)
                    .ok()
                    .and_then(|s| DeliveryStatus::try_from(s).ok());
                let Some(status) = status else {
                    tracing::warn!(twin = %state.core.id, "delivery report without status");
                    return Ok(());
                };
                let now = state.ctx.now_ns();
                if state.core.desired_outcome(
                    &update.property,
                    update.revision,
                    status,
                    &update.reason,
                    now,
                ) {
                    state.persist()?;
                    let kind = match status {
                        DeliveryStatus::Rejected => "desired_rejected",
                        _ => "desired_delivered",
                    };
                    state
                        .publish_event(
                            kind,
                            format!(
                                "set-point {}={} {}",
                                update.property,
                                update.value,
                                if status == DeliveryStatus::Rejected {
                                    format!("rejected: {}", update.reason)
                                } else {
                                    "delivered".to_owned()
                                }
                            ),
                            vec![
                                ("property", update.property.clone()),
                                ("revision", update.revision.to_string()),
                            ],
                        )
                        .await;
                    state.state_changed(&myself).await;
                }
            }
            TwinMsg::Tick => {
                state.tick_at = None;
                if state.dirty {
                    state.publish_state().await;
                }
                if let Some(wait) = state.maybe_replicate().await {
                    state.arm_tick(&myself, wait);
                }
                if let Some(idle) = state.passivate_after() {
                    let quiet = state.last_activity.elapsed();
                    if quiet >= idle && state.can_passivate() {
                        state.passivate(&myself).await?;
                        return Ok(());
                    }
                    // Not idle long enough, or something still in flight: look again.
                    let wait = idle.saturating_sub(quiet).max(Duration::from_millis(100));
                    state.arm_tick(&myself, wait);
                }
                if state.backfill_due.is_some_and(|t| Instant::now() >= t) {
                    state.check_backfill(&myself).await;
                } else if let Some(t) = state.backfill_due {
                    state.arm_tick(&myself, t - Instant::now());
                }
                if state.core.pending_desired().next().is_some() {
                    let retry = state.ctx.twin_config.desired_retry;
                    if state.last_desired_send.is_none_or(|t| t.elapsed() >= retry) {
                        state.send_pending_desired().await;
                    }
                    state.arm_tick(&myself, retry);
                }
            }
            TwinMsg::Inspect(reply) => {
                let _ = reply.send(state.get_twin());
            }
            TwinMsg::Features {
                signal,
                start_ns,
                end_ns,
                features,
            } => {
                state
                    .on_features(&myself, signal, start_ns, end_ns, features)
                    .await?;
            }
            TwinMsg::Identifiers(batch) => state.on_identifiers(batch).await,
            TwinMsg::Fail(reason) => return Err(Error::actor(reason).into()),
            TwinMsg::Charge(charge, reply) => {
                let out = state.charge(&myself, charge).await;
                let _ = reply.send(out);
            }
        }
        Ok(())
    }
}

/// The snapshot the cloud keeps for `id`, if the cloud answers within a second.
/// A model version from the cloud's registry.
/// A model version from the cloud's registry. A node that just started may not see the
/// registry's queryable yet: asked again for a few seconds.
async fn fetch_model(
    ctx: &NodeContext,
    model_id: &str,
    version: u64,
) -> Option<proto::ModelRecord> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(replies) = ctx
            .fabric
            .query(
                &keys::model(model_id, version),
                None,
                Duration::from_secs(2),
            )
            .await
        {
            if let Some(r) = replies
                .into_iter()
                .find_map(|r| proto::ModelRecord::decode(r.payload).ok())
            {
                return Some(r);
            }
        }
        if Instant::now() >= deadline || ctx.cancel.is_cancelled() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fetch_replica(ctx: &NodeContext, id: &TwinId) -> Option<TwinSnapshot> {
    let replies = ctx
        .fabric
        .query(&keys::snapshot(id), None, Duration::from_secs(1))
        .await
        .ok()?;
    replies
        .into_iter()
        .filter_map(|r| TwinSnapshot::decode(r.payload).ok())
        .max_by_key(|s| (s.epoch, s.twin.as_ref().map_or(0, |t| t.revision)))
}

/// Decodes and validates one telemetry sample, counting and logging what it drops.
/// Most records one identifier batch may carry.
pub const MAX_IDENTIFIER_RECORDS: usize = 10_000;
/// Longest identifier accepted.
pub const MAX_IDENTIFIER_LEN: usize = 128;

/// A sample on one of the kind's identifier streams: checked, then handed to the actor
/// (which checks it against the policy). Never a frame.
fn decode_identifiers(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    stream: &str,
    sample: &Sample,
) {
    use twinmesh_twins::frame::FrameRejection;
    let batch = match proto::IdentifierBatch::decode(sample.payload.clone()) {
        Ok(b) => b,
        Err(e) => {
            ctx.metrics
                .reject(&sample.key, &FrameRejection::Malformed(e.to_string()));
            return;
        }
    };
    let bad = if batch.twin_id != id.to_string() || batch.stream != stream {
        Some("identifier batch for another twin or stream than its key")
    } else if batch.records.is_empty() || batch.records.len() > MAX_IDENTIFIER_RECORDS {
        Some("identifier batch with no records, or too many")
    } else if batch.records.iter().any(|r| {
        r.identifier.is_empty()
            || r.identifier.len() > MAX_IDENTIFIER_LEN
            || r.identifier.chars().any(|c| c.is_control() || c == ',')
    }) {
        Some("identifier empty, too long or with control characters or commas")
    } else {
        None
    };
    match bad {
        Some(why) => ctx
            .metrics
            .reject(&sample.key, &FrameRejection::Invalid(why)),
        None => {
            let _ = actor.cast(TwinMsg::Identifiers(batch));
        }
    }
}

fn decode_frame(
    ctx: &NodeContext,
    actor: &ActorRef<TwinMsg>,
    id: &TwinId,
    kind: AssetKind,
    sample: &Sample,
) -> Option<TelemetryFrame> {
    use twinmesh_twins::frame::FrameRejection;
    NodeMetrics::add(&ctx.metrics.frames_in, 1);
    let limit = ctx.twin_config.max_frame_bytes;
    let rejected = |why: FrameRejection| {
        ctx.metrics.reject(&sample.key, &why);
        None
    };
    if sample.payload.len() > limit {
        return rejected(FrameRejection::Oversized {
            bytes: sample.payload.len(),
            limit,
        });
    }
    let Some((_, _, key_signal)) = keys::parse_telemetry(&sample.key) else {
        return rejected(FrameRejection::Invalid("not a telemetry key"));
    };
    if kind.schema().identifier(key_signal).is_some() {
        decode_identifiers(ctx, actor, id, key_signal, sample);
        return None;
    }
    let mut f = match TelemetryFrame::decode(sample.payload.clone()) {
        Ok(f) => f,
        Err(e) => return rejected(FrameRejection::Malformed(e.to_string())),
    };
    if !f.sealed.is_empty() {
        // A protected signal: its samples travel sealed with the site key.
        let Some(ring) = ctx.site_key.as_ref() else {
            return rejected(FrameRejection::Invalid(
                "sealed frame, and this node has no site key",
            ));
        };
        let plain = match ring.open(&frame::seal_context(&f), &f.sealed) {
            Ok(p) => p,
            Err(_) => return rejected(FrameRejection::Invalid("sealed frame does not open")),
        };
        match proto::SealedSamples::decode(plain.as_slice()) {
            Ok(inner) => {
                f.samples = inner.samples;
                f.packed = inner.packed;
                f.sealed.clear();
            }
            Err(e) => return rejected(FrameRejection::Malformed(e.to_string())),
        }
    }
    if let Err(why) = frame::unpack(&mut f) {
        return rejected(why);
    }
    match frame::validate(&f, &sample.key, id, key_signal, kind) {
        Ok(()) => Some(f),
        Err(why) => rejected(why),
    }
}

async fn ingest_pump(
    actor: ActorRef<TwinMsg>,
    ctx: Arc<NodeContext>,
    id: TwinId,
    kind: AssetKind,
    sub: Subscription,
    cancel: CancellationToken,
) {
    let batch_max = ctx.twin_config.ingest_batch;
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = sub.rx.recv_async() => match s { Ok(s) => s, Err(_) => break },
        };
        let mut batch = Vec::with_capacity(batch_max);
        batch.extend(decode_frame(&ctx, &actor, &id, kind, &first));
        while batch.len() < batch_max {
            match sub.rx.try_recv() {
                Ok(s) => batch.extend(decode_frame(&ctx, &actor, &id, kind, &s)),
                Err(_) => break,
            }
        }
        let overflow = sub.dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
        if overflow > 0 {
            NodeMetrics::add(&ctx.metrics.frames_overflow, overflow);
        }
        if batch.is_empty() {
            continue;
        }
        let acks = match actor
            .call(
                |tx| TwinMsg::Ingest(batch, tx),
                Some(ctx.twin_config.call_timeout),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(acks)) => acks,
            // The actor stopped or failed: its supervisor restarts it with a new pump;
            // the gateway re-sends what was not acknowledged.
            _ => break,
        };
        if let Err(e) = ctx.store.flush().await {
            tracing::error!(twin = %id, "flush failed, frames stay unacknowledged: {e}");
            continue;
        }
        for (signal, seq) in acks.watermarks {
            let wm = Watermark {
                twin_id: id.to_string(),
                signal,
                seq,
                epoch: acks.epoch,
            };
            if let Err(e) = ctx
                .fabric
                .publish(
                    &keys::acks(&id),
                    Bytes::from(wm.encode_to_vec()),
                    encoding::WATERMARK,
                    Qos::Reliable,
                )
                .await
            {
                tracing::warn!(twin = %id, "ack not published: {e}");
            }
        }
    }
    drop(sub);
}

async fn rpc_pump(
    actor: ActorRef<TwinMsg>,
    ctx: Arc<NodeContext>,
    id: TwinId,
    kind: AssetKind,
    queryable: crate::ports::Queryable,
    cancel: CancellationToken,
) {
    let key = keys::twin_rpc(&id);
    loop {
        let query = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            q = queryable.rx.recv_async() => match q { Ok(q) => q, Err(_) => break },
        };
        NodeMetrics::add(&ctx.metrics.rpc_served, 1);
        let reply = match TwinRequest::decode(query.payload.clone()) {
            Err(e) => error_reply(&DomainError::InvalidArgument(format!(
                "malformed twin request: {e}"
            ))),
            Ok(TwinRequest {
                request: Some(twin_request::Request::ImportHistory(req)),
                ..
            }) => {
                let reply = match import_history(&ctx, &id, kind, req) {
                    Ok(samples) => match ctx.store.flush().await {
                        Ok(()) => reply(twin_reply::Reply::ImportHistory(
                            proto::ImportHistoryResponse { samples },
                        )),
                        Err(e) => coded_error(
                            proto::ErrorCode::Unavailable,
                            format!("history of {id} not made durable: {e}"),
                        ),
                    },
                    Err(e) => error_reply(&e),
                };
                send_reply(query, &key, &reply).await;
                continue;
            }
            Ok(TwinRequest {
                request: Some(twin_request::Request::Release(r)),
                caller,
            }) => {
                let fut = crate::privacy::serve_release(
                    ctx.clone(),
                    actor.clone(),
                    id.clone(),
                    kind,
                    r,
                    caller,
                );
                reply_later(&ctx, query, key.clone(), fut);
                continue;
            }
            Ok(TwinRequest {
                request: Some(twin_request::Request::Contribute(r)),
                ..
            }) => {
                let fut = crate::privacy::serve_contribute(
                    ctx.clone(),
                    actor.clone(),
                    id.clone(),
                    kind,
                    r,
                );
                reply_later(&ctx, query, key.clone(), fut);
                continue;
            }
            Ok(TwinRequest {
                request: Some(twin_request::Request::QueryHistory(h)),
                caller,
            }) => {
                // Scans can be long: serve them off the actor and off the async workers.
                let (ctx2, id2, actor2) = (ctx.clone(), id.clone(), actor.clone());
                let fut = async move {
                    // Off the site (or below data_operator), raw history of protected
                    // signals and their features is never served.
                    if !privacy::sees_raw(caller.as_ref(), id2.site()) {
                        match crate::privacy::policy_of(&ctx2, &actor2, &id2, kind).await {
                            Ok(p) => {
                                let site = id2.site();
                                if let Err(why) =
                                    p.offsite_history(site, &h.signal, h.bucket_ns, h.aggregation())
                                {
                                    return error_reply(&DomainError::PermissionDenied(why));
                                }
                            }
                            Err(e) => return reply(twin_reply::Reply::Error(e)),
                        }
                    }
                    match tokio::task::spawn_blocking(move || query_history(&ctx2, &id2, h)).await {
                        Ok(r) => r,
                        Err(e) => error_reply(&DomainError::InvalidArgument(format!(
                            "history query failed: {e}"
                        ))),
                    }
                };
                reply_later(&ctx, query, key.clone(), fut);
                continue;
            }
            Ok(req) => match actor
                .call(
                    |tx| TwinMsg::Request(req, tx),
                    Some(ctx.twin_config.call_timeout),
                )
                .await
            {
                Ok(ractor::rpc::CallResult::Success(r)) => r,
                _ => coded_error(
                    proto::ErrorCode::Unavailable,
                    format!("twin {id} is restarting"),
                ),
            },
        };
        send_reply(query, &key, &reply).await;
    }
}

/// Answers `query` with what `reply` computes, off the RPC pump (releases can take a
/// while: history reads, set coordination).
fn reply_later(
    ctx: &NodeContext,
    query: crate::ports::Query,
    key: String,
    reply: impl std::future::Future<Output = TwinReply> + Send + 'static,
) {
    ctx.tasks.spawn(async move {
        let reply = reply.await;
        send_reply(query, &key, &reply).await;
    });
}

async fn send_reply(query: crate::ports::Query, key: &str, reply: &TwinReply) {
    query
        .reply(
            key,
            Bytes::from(reply.encode_to_vec()),
            encoding::TWIN_REPLY,
        )
        .await;
}

fn error_reply(e: &DomainError) -> TwinReply {
    reply(twin_reply::Reply::Error(e.into()))
}

fn reply(r: twin_reply::Reply) -> TwinReply {
    TwinReply { reply: Some(r) }
}

/// An error reply for failures that are not the caller's (storage, restarts).
fn coded_error(code: proto::ErrorCode, message: String) -> TwinReply {
    reply(twin_reply::Reply::Error(proto::Error {
        code: code as i32,
        message,
    }))
}

fn query_history(ctx: &NodeContext, id: &TwinId, h: proto::QueryHistoryRequest) -> TwinReply {
    match validate_history(id, &h) {
        Err(e) => error_reply(&e),
        Ok(agg) => {
            match ctx
                .store
                .query_history(id, &h.signal, h.start_ns, h.end_ns, h.bucket_ns, agg)
            {
                Ok(buckets) => reply(twin_reply::Reply::QueryHistory(
                    proto::QueryHistoryResponse { buckets },
                )),
                Err(e) => coded_error(proto::ErrorCode::Internal, format!("history of {id}: {e}")),
            }
        }
    }
}

/// Most samples one import request may carry.
pub const MAX_IMPORT_SAMPLES: usize = 1 << 20;

/// Stores imported samples as history, keyed by time (seq 0), so a re-run overwrites
/// the same entries instead of adding new ones.
fn import_history(
    ctx: &NodeContext,
    id: &TwinId,
    kind: AssetKind,
    req: proto::ImportHistoryRequest,
) -> std::result::Result<u64, DomainError> {
    if req.twin_id != id.to_string() {
        return Err(DomainError::UnknownTwin(req.twin_id));
    }
    kind.schema().signal(&req.signal)?;
    if req.samples.is_empty() || req.samples.len() > MAX_IMPORT_SAMPLES {
        return Err(DomainError::InvalidArgument(format!(
            "import of {} samples: expected 1..={MAX_IMPORT_SAMPLES}",
            req.samples.len()
        )));
    }
    if req.sample_period_ns <= 0 {
        return Err(DomainError::InvalidArgument(format!(
            "invalid sample_period_ns {}: must be positive",
            req.sample_period_ns
        )));
    }
    if let Some(i) = req.samples.iter().position(|x| !x.is_finite()) {
        return Err(DomainError::InvalidArgument(format!(
            "sample {i} is not finite"
        )));
    }
    let n = req.samples.len() as u64;
    let frame = StoredFrame {
        signal: req.signal,
        seq: 0,
        start_ns: req.start_ns,
        sample_period_ns: req.sample_period_ns,
        samples: req.samples,
        scale: 0.0,
    };
    ctx.store
        .append_frames(id, &[frame])
        .map_err(|e| DomainError::InvalidArgument(format!("import not stored: {e}")))?;
    Ok(n)
}

/// Checks a history request against the twin (DESIGN §9 error rules).
pub fn validate_history(
    id: &TwinId,
    h: &proto::QueryHistoryRequest,
) -> std::result::Result<Aggregation, DomainError> {
    if h.twin_id != id.to_string() {
        return Err(DomainError::UnknownTwin(h.twin_id.clone()));
    }
    if h.start_ns >= h.end_ns {
        return Err(DomainError::InvalidRange {
            start_ns: h.start_ns,
            end_ns: h.end_ns,
        });
    }
    if h.bucket_ns <= 0 {
        return Err(DomainError::InvalidBucket(h.bucket_ns));
    }
    let buckets = ((h.end_ns as i128 - h.start_ns as i128 + h.bucket_ns as i128 - 1)
        / h.bucket_ns as i128) as u64;
    if buckets > MAX_HISTORY_BUCKETS {
        return Err(DomainError::TooManyBuckets {
            buckets,
            max: MAX_HISTORY_BUCKETS,
        });
    }
    let agg = proto::Aggregation::try_from(h.aggregation).map_err(|_| {
        DomainError::InvalidArgument(format!("unknown aggregation {}", h.aggregation))
    })?;
    Aggregation::try_from(agg)
}

async fn control_listener(actor: ActorRef<TwinMsg>, sub: Subscription, cancel: CancellationToken) {
    loop {
        let sample = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = sub.rx.recv_async() => match s { Ok(s) => s, Err(_) => break },
        };
        match DesiredUpdate::decode(sample.payload) {
            Ok(update) => {
                if actor.cast(TwinMsg::DesiredOutcome(update)).is_err() {
                    break;
                }
            }
            Err(e) => tracing::warn!(key = sample.key, "malformed delivery report: {e}"),
        }
    }
}
