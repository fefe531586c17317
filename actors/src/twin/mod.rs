//! `TwinActor`: one per asset. It ingests telemetry frames (dropping duplicates and
//! out-of-order frames by `seq`), keeps the twin's state, persists history and snapshots
//! through the `Store`, acknowledges frames only once they are durable, publishes state
//! and events through the `Fabric`, and answers the twin's RPCs.
//!
//! One task feeds the actor, owned by the node's tracker and cancelled with it: the
//! twin's [`pump`] (telemetry → validate → batch → apply → flush → ack; the twin's
//! queryable; delivery reports). On an edge node it runs only while the twin has
//! input (the router starts it).
//!
//! # Layout
//!
//! - this module: [`TwinActor`], its messages ([`TwinMsg`]), its state
//!   ([`TwinActorState`]) with the plumbing every part uses (persist, publish, ticks),
//!   and the `impl Actor` that dispatches to the parts below.
//! - [`pump`]: the twin's one task, feeding the actor from its three inputs (on edges,
//!   only while there is input).
//! - [`ingest`]: decode, validate, batch, apply (admission by `seq`), flush, then
//!   publish the watermarks; identifier batches.
//! - [`rpc`]: the twin's calls (get, set-points, chain, model, history import and
//!   queries).
//! - [`desired`]: set-points sent to the gateway, re-sent until a delivery report comes
//!   back.
//! - [`analysis`]: analysis windows off the actor, features, anomaly scoring, the
//!   installed model and the processing chain.
//! - [`lifecycle`]: start from the newest snapshot, replication to the cloud, backfill
//!   of history holes, freeze for a migration, passivation when idle.
//! - [`privacy`]: the twin side of privacy: what leaves the site (gated snapshots and
//!   state), the privacy policy, the ε ledger and identifier streams.
//! - [`release`]: DP releases served where the twin lives (single twin, and set
//!   releases coordinated on the site with sealed contributions).
//! - [`cache`]: the twin's last `GetTwin` answers, which the node's router serves
//!   without waking the twin while it has not changed.

mod analysis;
mod cache;
mod desired;
mod ingest;
mod lifecycle;
mod privacy;
mod pump;
pub mod release;
mod rpc;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use crate::wire::{self, TypedFabric};
use twinmesh_twins::chain::Analyzer;
use twinmesh_twins::monitor::Monitor;
use twinmesh_twins::proto::{
    self, DesiredUpdate, Placement, TelemetryFrame, TwinEvent, TwinReply, TwinRequest,
    TwinSnapshot, TwinSummary,
};
use twinmesh_twins::{keys, AssetKind, Error as DomainError, TwinCore, TwinId};

use crate::context::NodeContext;
use crate::error::{Error, Result};
use crate::metrics::NodeMetrics;
use crate::ports::Qos;

pub use cache::ReplyCache;
pub use ingest::{MAX_IDENTIFIER_LEN, MAX_IDENTIFIER_RECORDS};

pub enum TwinMsg {
    /// Validated frames, in arrival order. Replies with the watermarks to acknowledge
    /// once the store has flushed.
    Ingest(Vec<TelemetryFrame>, RpcReplyPort<IngestAck>),
    /// A twin RPC (everything but history, which the twin's task serves from the store).
    Request(TwinRequest, RpcReplyPort<TwinReply>),
    /// A twin RPC the actor answers straight to its query; `done` tells the twin's task
    /// it has.
    Serve(
        TwinRequest,
        crate::ports::Query,
        tokio::sync::oneshot::Sender<()>,
    ),
    /// The gateway's answer to a set-point.
    DesiredOutcome(DesiredUpdate),
    /// Publish state if it changed / re-send pending set-points.
    Tick,
    /// The current state, for tests and admin.
    Inspect(RpcReplyPort<proto::Twin>),
    /// The current privacy policy (releases read only this).
    Policy(RpcReplyPort<Arc<twinmesh_twins::privacy::Policy>>),
    /// The policy and the lineage of the twin's features and model (the history gate).
    Gate(
        RpcReplyPort<(
            Arc<twinmesh_twins::privacy::Policy>,
            twinmesh_twins::privacy::Lineage,
        )>,
    ),
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

impl TwinMsg {
    /// Whether handling it leaves the twin as it was (its read cache stays valid).
    fn is_read(&self) -> bool {
        use twinmesh_twins::proto::twin_request::Request;
        match self {
            TwinMsg::Inspect(_) | TwinMsg::Policy(_) | TwinMsg::Gate(_) => true,
            TwinMsg::Request(r, _) | TwinMsg::Serve(r, _, _) => {
                matches!(r.request, Some(Request::GetTwin(_)))
            }
            _ => false,
        }
    }
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

/// Stop reason of a twin that went dormant (its node wakes it on demand).
pub const PASSIVATED: &str = "passivated";

pub struct TwinArgs {
    pub ctx: Arc<NodeContext>,
    /// Shared with the node supervisor's record of the twin (neither changes it).
    pub placement: Arc<Placement>,
}

pub struct TwinActor;

pub struct TwinActorState {
    ctx: Arc<NodeContext>,
    core: TwinCore,
    placement: Arc<Placement>,
    dirty: bool,
    last_state_publish: Option<Instant>,
    /// When the next armed tick fires (a nearer need arms another one; a tick re-arms
    /// whatever is still pending, so an extra one is harmless).
    tick_at: Option<Instant>,
    last_desired_send: Option<Instant>,
    /// Cuts incoming streams into the windows of the chain's edge stages (built on the
    /// first frame: an idle twin holds no window buffers).
    analyzer: Option<Analyzer>,
    /// Recent values of process (non-waveform) signals: the context of analysis windows
    /// (e.g. shaft speed averaged over a vibration window).
    recent: twinmesh_twins::window::WindowContext,
    /// Frozen for a migration: frames are no longer applied nor acknowledged, and
    /// mutating requests are refused (the new owner takes over).
    frozen: bool,
    /// When the freeze expires: a move not committed by then is abandoned, and the twin
    /// goes on here (the authority refuses a later commit).
    thaw_at: Option<Instant>,
    /// Last frame, request or delivery report (passivation).
    last_activity: Instant,
    /// History checks left after start, and when the next is due.
    backfill_checks: u32,
    backfill_due: Option<Instant>,
    /// Revision of the last snapshot replicated to the cloud, and when.
    replicated_revision: Option<u64>,
    last_replication: Option<Instant>,
    /// Scores feature windows with the installed anomaly model, if any (boxed: most
    /// twins have none, and an idle twin should not carry its space).
    monitor: Option<Box<Monitor>>,
    /// Cancels this twin's tasks when it stops.
    cancel: CancellationToken,
    /// Its last `GetTwin` answers, on edge nodes (the router serves them).
    cache: Option<Arc<ReplyCache>>,
    /// Its registration with the node's router (edge nodes): dropped with the actor's
    /// state, which unregisters it.
    registration: Option<[crate::ports::Guard; 3]>,
}

impl TwinActorState {
    fn snapshot(&self) -> TwinSnapshot {
        TwinSnapshot {
            twin: Some(self.core.to_proto(Some((*self.placement).clone()))),
            epoch: self.placement.epoch,
            saved_ns: self.ctx.now_ns(),
            node: self.ctx.node.to_string(),
            site_only: self.core.policy.signals.values().any(|s| s.protected()),
            proof: None,
        }
    }

    /// What the twin's features and installed model are computed from.
    fn lineage(&self) -> twinmesh_twins::privacy::Lineage {
        let l = twinmesh_twins::privacy::Lineage::of(&self.core.chain);
        match &self.monitor {
            Some(m) => l.with_model(&m.model().features),
            None => l,
        }
    }

    fn summary(&self) -> TwinSummary {
        // Listed to every caller: the status of a model over protected data stays here.
        let status = if self.core.policy.is_protected_model(&self.lineage()) {
            twinmesh_twins::privacy::HEALTH_WITHHELD.to_owned()
        } else {
            self.core.health.status.clone()
        };
        TwinSummary {
            twin_id: self.core.id.to_string(),
            kind: self.core.kind.to_string(),
            node: self.placement.node.clone(),
            tier: self.placement.tier.clone(),
            status,
            revision: self.core.revision,
        }
    }

    async fn publish<M: wire::Wire>(&self, key: String, message: &M, qos: Qos) {
        let len = message.encoded_len() as u64;
        match self.ctx.fabric.put(&key, message, qos).await {
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
        self.publish(keys::twin_state(&self.core.id), &state, Qos::Latest)
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
        self.publish(keys::twin_events(&self.core.id), &event, Qos::Reliable)
            .await;
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

    fn get_twin(&self) -> proto::Twin {
        self.core.to_proto(Some((*self.placement).clone()))
    }

    fn check_twin_id(&self, twin_id: &str) -> Result<(), DomainError> {
        if twin_id == self.core.id.to_string() {
            Ok(())
        } else {
            Err(DomainError::UnknownTwin(twin_id.to_owned()))
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
        let kind: AssetKind = crate::kinds::resolve(&ctx, &placement.kind).await?;
        let (core, restored) = lifecycle::restore_core(&ctx, &placement, &id, kind).await?;
        let cancel = ctx.cancel.child_token();
        let state = TwinActorState {
            ctx: ctx.clone(),
            analyzer: None,
            recent: Default::default(),
            frozen: false,
            thaw_at: None,
            last_activity: Instant::now(),
            backfill_checks: lifecycle::BACKFILL_CHECKS,
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
            cache: None,
            registration: None,
        };
        let mut state = state;
        state.restore_model().await;
        state.persist()?;

        // Declare the fabric side before the actor counts as started, so a twin that is
        // up is reachable.
        let ((feeds, guards), kick) = if ctx.router.is_active() {
            // Edge: the node's router hands this twin its frames, calls and reports, and
            // starts its task when they come.
            let r = ctx.router.register(&id, ctx.twin_config.ingest_queue);
            state.cache = Some(r.cache);
            (
                pump::Feeds::split(r.telemetry, r.rpc, r.delivered),
                Some(r.kick),
            )
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
            (pump::Feeds::split(telemetry, rpc, delivered), None)
        };
        let pump = pump::Pump {
            actor: myself.clone(),
            ctx: ctx.clone(),
            id: id.clone(),
            kind,
            feeds,
            cancel: cancel.clone(),
        };
        match kick {
            Some(kick) => {
                state.registration = Some(guards);
                pump.start_on_kick(&kick);
                // What arrived while it was starting.
                kick.kick();
            }
            None => {
                ctx.tasks.spawn(async move {
                    pump.run(None).await;
                    // The declarations live as long as the task.
                    drop(guards);
                });
            }
        }
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
        // Each message's work gets its own allocation: ractor keeps the loop future of
        // every actor for its whole life, and inlining the largest handler into it
        // would make every idle twin as large as its busiest path.
        Box::pin(state.dispatch(myself, msg)).await
    }
}

impl TwinActorState {
    async fn dispatch(
        &mut self,
        myself: ActorRef<TwinMsg>,
        msg: TwinMsg,
    ) -> std::result::Result<(), ActorProcessingErr> {
        let state = self;
        // Anything but a read may change what a `GetTwin` answers: forget the cached
        // answers before it runs.
        if let Some(cache) = state.cache.as_ref().filter(|_| !msg.is_read()) {
            cache.clear();
        }
        if matches!(
            msg,
            TwinMsg::Ingest(..)
                | TwinMsg::Request(..)
                | TwinMsg::Serve(..)
                | TwinMsg::DesiredOutcome(_)
        ) {
            state.last_activity = Instant::now();
            if let Some(idle) = state.passivate_after() {
                state.arm_tick(&myself, idle);
            }
        }
        match msg {
            TwinMsg::Ingest(frames, reply) => state.on_ingest(&myself, frames, reply).await?,
            TwinMsg::Request(req, reply) => state.on_request(&myself, req, reply).await,
            TwinMsg::Serve(req, query, done) => {
                state.on_serve(&myself, req, query).await;
                let _ = done.send(());
            }
            TwinMsg::DesiredOutcome(update) => state.on_desired_outcome(&myself, update).await?,
            TwinMsg::Tick => state.on_tick(&myself).await?,
            TwinMsg::Inspect(reply) => {
                let _ = reply.send(state.get_twin());
            }
            TwinMsg::Policy(reply) => {
                let _ = reply.send(state.core.policy.clone());
            }
            TwinMsg::Gate(reply) => {
                let _ = reply.send((state.core.policy.clone(), state.lineage()));
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
