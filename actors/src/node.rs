//! `NodeSupervisor`: one per node that hosts twins. It spawns the twins placed on its
//! node (from its own store at start-up — so an edge restarts its twins while the cloud is
//! down — and from the placement authority), restarts a crashed twin from its last
//! persisted state.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use prost::Message;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio_util::sync::CancellationToken;

use twinmesh_proto::encoding;
use twinmesh_twins::proto::{
    twin_reply, ErrorCode, Placement, PlacementQuery, TwinReply, TwinSummary,
};
use twinmesh_twins::{keys, TwinId};

use crate::context::NodeContext;
use crate::mesh::STATUS_ACTIVE;
use crate::metrics::NodeMetrics;
use crate::ports::SampleKind;
use crate::twin::{TwinActor, TwinArgs, TwinMsg};

/// A twin that fails more often than this within `RESTART_WINDOW` is given up on.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

pub enum NodeMsg {
    /// Host this twin (no-op when already hosted at this epoch or a newer one).
    Place(Placement),
    /// Stop hosting this twin.
    Unplace(TwinId),
    /// The authority placed a twin on another node (or nowhere): a hosted copy of an
    /// older epoch is stale and stops (fencing).
    PlacedElsewhere(Placement),
    /// The actor of a hosted twin.
    Lookup(TwinId, RpcReplyPort<Option<ActorRef<TwinMsg>>>),
    /// Placements of the twins this node hosts.
    Hosted(RpcReplyPort<Vec<Placement>>),
    /// A frame or a call for a twin that is dormant here: start it.
    Wake(TwinId),
}

struct Hosted {
    actor: Option<ActorRef<TwinMsg>>,
    placement: Placement,
    restarts: Vec<Instant>,
    /// Passivated: registered here, no actor until its next frame or call.
    dormant: bool,
}

/// Status of a dormant twin in listings and in the node's hosted records.
pub const STATUS_DORMANT: &str = "dormant";

pub struct NodeSupervisor;

pub struct NodeSupervisorState {
    ctx: Arc<NodeContext>,
    twins: std::collections::BTreeMap<TwinId, Hosted>,
    by_actor: HashMap<ActorId, TwinId>,
    cancel: CancellationToken,
    /// Twins registered here without an actor (passivated), read by the watcher.
    dormant: Arc<Mutex<HashSet<TwinId>>>,
    /// Declared while dormant twins exist: wakes them on frames and calls.
    dormant_watch: Option<CancellationToken>,
}

impl NodeSupervisorState {
    /// Marks a hosted twin dormant or awake, keeping the set the watcher reads, the
    /// directory and the watcher's declarations in step.
    async fn set_dormant(&mut self, myself: &ActorRef<NodeMsg>, id: &TwinId, dormant: bool) {
        {
            let mut set = self.dormant.lock().expect("dormant set lock");
            if dormant {
                set.insert(id.clone());
            } else {
                set.remove(id);
            }
        }
        if let Some(h) = self.twins.get_mut(id) {
            h.dormant = dormant;
        }
        if dormant {
            self.ctx.directory.set_status(id, STATUS_DORMANT);
        }
        self.watch_dormant(myself).await;
    }

    /// Forgets a twin this node no longer hosts (unplaced, fenced).
    async fn forget(&mut self, myself: &ActorRef<NodeMsg>, id: &TwinId, why: &str) {
        if let Some(h) = self.twins.remove(id) {
            if let Some(a) = h.actor {
                self.by_actor.remove(&a.get_id());
                a.stop(Some(why.into()));
            }
            if h.dormant {
                self.dormant.lock().expect("dormant set lock").remove(id);
                self.watch_dormant(myself).await;
            }
        }
    }

    /// Declares (or, with no dormant twin left, withdraws) the node-wide subscription and
    /// queryable that wake dormant twins. They cover the node's own site: only edges
    /// passivate (a cloud node hosts twins of every site, and a wildcard over all of
    /// them would bring other sites' raw telemetry to it).
    async fn watch_dormant(&mut self, myself: &ActorRef<NodeMsg>) {
        let needed = !self.dormant.lock().expect("dormant set lock").is_empty();
        match (needed, self.dormant_watch.is_some()) {
            (true, false) => {
                let site = self.ctx.site.clone();
                let frames = self
                    .ctx
                    .fabric
                    .subscribe(&format!("twinmesh/telemetry/{site}/*/*"), 4096)
                    .await;
                let calls = self
                    .ctx
                    .fabric
                    .queryable(&format!("twinmesh/rpc/twins/{site}/*"), 1024)
                    .await;
                let (Ok(frames), Ok(calls)) = (frames, calls) else {
                    tracing::warn!("cannot watch for dormant twins; they wake on placement only");
                    return;
                };
                let cancel = self.cancel.child_token();
                self.dormant_watch = Some(cancel.clone());
                self.ctx.tasks.spawn(dormant_watcher(
                    myself.clone(),
                    self.dormant.clone(),
                    frames,
                    calls,
                    cancel,
                ));
            }
            (false, true) => {
                if let Some(c) = self.dormant_watch.take() {
                    c.cancel();
                }
            }
            _ => {}
        }
    }

    async fn spawn_twin(&mut self, myself: &ActorRef<NodeMsg>, id: TwinId) {
        let Some(hosted) = self.twins.get_mut(&id) else {
            return;
        };
        let args = TwinArgs {
            ctx: self.ctx.clone(),
            placement: hosted.placement.clone(),
        };
        match Actor::spawn_linked(None, TwinActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                self.by_actor.insert(actor.get_id(), id.clone());
                hosted.actor = Some(actor);
            }
            Err(e) => {
                tracing::error!(twin = %id, "twin failed to start ({e}); retrying in 1 s");
                let placement = hosted.placement.clone();
                myself.send_after(Duration::from_secs(1), move || NodeMsg::Place(placement));
            }
        }
    }

    async fn on_exit(&mut self, myself: &ActorRef<NodeMsg>, actor: ActorId, why: String) {
        let Some(id) = self.by_actor.remove(&actor) else {
            return;
        };
        let Some(hosted) = self.twins.get_mut(&id) else {
            return;
        };
        hosted.actor = None;
        if self.cancel.is_cancelled() {
            return;
        }
        if why == crate::twin::PASSIVATED {
            // Registered here without an actor: a restart of the node keeps it asleep.
            let mut record = hosted.placement.clone();
            record.status = STATUS_DORMANT.to_owned();
            if let Err(e) = self.ctx.store.save_hosted(&record) {
                tracing::warn!(twin = %id, "dormant record not stored: {e}");
            }
            NodeMetrics::add(&self.ctx.metrics.twins_passivated, 1);
            self.set_dormant(myself, &id, true).await;
            return;
        }
        let now = Instant::now();
        hosted
            .restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if hosted.restarts.len() >= MAX_RESTARTS {
            tracing::error!(twin = %id, "twin failed {MAX_RESTARTS} times within {RESTART_WINDOW:?} ({why}); not restarting");
            self.twins.remove(&id);
            self.ctx.directory.remove(&id);
            return;
        }
        hosted.restarts.push(now);
        NodeMetrics::add(&self.ctx.metrics.twin_restarts, 1);
        tracing::warn!(twin = %id, "twin stopped unexpectedly ({why}); restarting from its last persisted state");
        self.spawn_twin(myself, id).await;
    }
}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeSupervisorState;
    type Arguments = Arc<NodeContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<NodeContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cancel = ctx.cancel.child_token();
        // Placements published by the authority, and a full sync whenever a node (the
        // cloud among them) appears.
        let placements = ctx.fabric.subscribe(keys::PLACEMENT_ALL, 1024).await?;
        let members = ctx.fabric.liveliness_subscribe(keys::NODE_TOKENS).await?;
        ctx.tasks.spawn(placement_watcher(
            myself.clone(),
            ctx.clone(),
            placements,
            members,
            cancel.clone(),
        ));
        Ok(NodeSupervisorState {
            ctx,
            twins: std::collections::BTreeMap::new(),
            by_actor: HashMap::new(),
            dormant: Default::default(),
            dormant_watch: None,
            cancel,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Twins this node hosted before it stopped come back at once, cloud or not.
        let mut dormant = Vec::new();
        for mut placement in state.ctx.store.hosted()? {
            if placement.status != STATUS_DORMANT {
                myself.cast(NodeMsg::Place(placement))?;
                continue;
            }
            // Stays asleep until its next frame or call.
            let Ok(id) = placement.twin_id.parse::<TwinId>() else {
                continue;
            };
            placement.status = STATUS_ACTIVE.to_owned();
            state.ctx.directory.upsert(
                &id,
                TwinSummary {
                    twin_id: placement.twin_id.clone(),
                    kind: placement.kind.clone(),
                    node: placement.node.clone(),
                    tier: placement.tier.clone(),
                    status: STATUS_DORMANT.to_owned(),
                    revision: 0,
                },
            );
            state.twins.insert(
                id.clone(),
                Hosted {
                    actor: None,
                    placement,
                    restarts: Vec::new(),
                    dormant: true,
                },
            );
            dormant.push(id);
        }
        if !dormant.is_empty() {
            tracing::info!(twins = dormant.len(), "dormant twins registered");
            state
                .dormant
                .lock()
                .expect("dormant set lock")
                .extend(dormant);
            state.watch_dormant(&myself).await;
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.cancel.cancel();
        myself
            .stop_children_and_wait(
                Some("node shutting down".into()),
                Some(Duration::from_secs(5)),
            )
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeMsg::Place(placement) => {
                let id: TwinId = match placement.twin_id.parse() {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!("ignoring placement: {e}");
                        return Ok(());
                    }
                };
                if placement.node != state.ctx.node.as_str() {
                    return Ok(());
                }
                if let Some(h) = state.twins.get(&id) {
                    if h.placement.epoch >= placement.epoch && (h.actor.is_some() || h.dormant) {
                        return Ok(());
                    }
                }
                state.ctx.store.save_hosted(&placement)?;
                let restarts = state
                    .twins
                    .get_mut(&id)
                    .map(|h| std::mem::take(&mut h.restarts))
                    .unwrap_or_default();
                state.forget(&myself, &id, "re-placed").await;
                state.twins.insert(
                    id.clone(),
                    Hosted {
                        actor: None,
                        placement,
                        restarts,
                        dormant: false,
                    },
                );
                state.spawn_twin(&myself, id).await;
            }
            NodeMsg::Unplace(id) => {
                if state.twins.contains_key(&id) {
                    state.forget(&myself, &id, "unplaced").await;
                    state.ctx.store.remove_hosted(&id)?;
                    state.ctx.directory.remove(&id);
                }
            }
            NodeMsg::PlacedElsewhere(p) => {
                let Ok(id) = p.twin_id.parse::<TwinId>() else {
                    return Ok(());
                };
                let stale = state.twins.get(&id).is_some_and(|h| {
                    h.placement.epoch < p.epoch && p.node != state.ctx.node.as_str()
                });
                if stale {
                    tracing::warn!(twin = %id, epoch = p.epoch, owner = p.node, "twin placed elsewhere at a newer epoch: stopping the stale copy here");
                    state.forget(&myself, &id, "fenced").await;
                    state.ctx.store.remove_hosted(&id)?;
                    state.ctx.directory.remove(&id);
                }
            }
            NodeMsg::Wake(id) => {
                let Some(record) = state
                    .twins
                    .get(&id)
                    .filter(|h| h.dormant)
                    .map(|h| h.placement.clone())
                else {
                    return Ok(());
                };
                state.ctx.store.save_hosted(&record)?;
                tracing::debug!(twin = %id, "waking a dormant twin");
                NodeMetrics::add(&state.ctx.metrics.twins_woken, 1);
                state.set_dormant(&myself, &id, false).await;
                state.spawn_twin(&myself, id).await;
            }
            NodeMsg::Lookup(id, reply) => {
                let _ = reply.send(state.twins.get(&id).and_then(|h| h.actor.clone()));
            }
            NodeMsg::Hosted(reply) => {
                let _ = reply.send(state.twins.values().map(|h| h.placement.clone()).collect());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Never stop the node because a twin ended (ractor's default would).
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                state.on_exit(&myself, cell.get_id(), err.to_string()).await;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                state
                    .on_exit(
                        &myself,
                        cell.get_id(),
                        reason.unwrap_or_else(|| "stopped".into()),
                    )
                    .await;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Wakes dormant twins of this node: a frame for one (the gateway re-sends it until the
/// woken twin acknowledges it) or a call to one (answered "unavailable, waking", which
/// callers retry within their deadline). Frames and calls for twins that are awake, or
/// hosted elsewhere, are left alone: the twins answer for themselves.
async fn dormant_watcher(
    node: ActorRef<NodeMsg>,
    dormant: Arc<Mutex<HashSet<TwinId>>>,
    frames: crate::ports::Subscription,
    calls: crate::ports::Queryable,
    cancel: CancellationToken,
) {
    let is_dormant = |id: &TwinId| dormant.lock().expect("dormant set lock").contains(id);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = frames.rx.recv_async() => {
                let Ok(s) = s else { break };
                if let Some(id) = keys::parse_twin_in(&s.key, "telemetry").filter(|id| is_dormant(id)) {
                    if node.cast(NodeMsg::Wake(id)).is_err() {
                        break;
                    }
                }
            }
            q = calls.rx.recv_async() => {
                let Ok(q) = q else { break };
                let Some(id) = keys::parse_twin_in(&q.key, "rpc/twins").filter(|id| is_dormant(id)) else {
                    continue;
                };
                if node.cast(NodeMsg::Wake(id.clone())).is_err() {
                    break;
                }
                let reply = TwinReply {
                    reply: Some(twin_reply::Reply::Error(twinmesh_twins::proto::Error {
                        code: ErrorCode::Unavailable as i32,
                        message: format!("twin {id} was dormant and is waking up"),
                    })),
                };
                q.reply(&keys::twin_rpc(&id), Bytes::from(reply.encode_to_vec()), encoding::TWIN_REPLY)
                    .await;
            }
        }
    }
}

/// Feeds the supervisor with placements: live publications, and a full pull of this
/// node's placements whenever a node joins (the authority may be the one that joined).
async fn placement_watcher(
    node: ActorRef<NodeMsg>,
    ctx: Arc<NodeContext>,
    placements: crate::ports::Subscription,
    members: crate::ports::Subscription,
    cancel: CancellationToken,
) {
    let pull = || async {
        let query = PlacementQuery {
            node: ctx.node.to_string(),
        };
        match ctx
            .fabric
            .query(
                keys::PLACEMENT_ALL,
                Some((
                    Bytes::from(query.encode_to_vec()),
                    encoding::PLACEMENT_QUERY,
                )),
                Duration::from_secs(5),
            )
            .await
        {
            Ok(replies) => {
                for r in replies {
                    if let Ok(p) = Placement::decode(r.payload) {
                        let _ = node.cast(NodeMsg::Place(p));
                    }
                }
            }
            Err(e) => tracing::debug!("placement pull failed: {e}"),
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = placements.rx.recv_async() => {
                let Ok(s) = s else { break };
                match Placement::decode(s.payload) {
                    Ok(p) if p.node == ctx.node.as_str() && p.status != "stale" => {
                        let _ = node.cast(NodeMsg::Place(p));
                    }
                    Ok(p) => {
                        let _ = node.cast(NodeMsg::PlacedElsewhere(p));
                    }
                    Err(e) => tracing::warn!(key = s.key, "malformed placement: {e}"),
                }
            }
            s = members.rx.recv_async() => {
                let Ok(s) = s else { break };
                if s.kind == SampleKind::Put {
                    pull().await;
                    reconcile(&node, &ctx).await;
                }
            }
        }
    }
}

/// Asks the authority about each twin hosted here: copies it placed elsewhere at a newer
/// epoch stop. Twins it does not answer for (authority unreachable) are kept: an edge
/// cut off from the cloud runs on.
async fn reconcile(node: &ActorRef<NodeMsg>, ctx: &NodeContext) {
    let Ok(ractor::rpc::CallResult::Success(hosted)) = node
        .call(NodeMsg::Hosted, Some(Duration::from_secs(5)))
        .await
    else {
        return;
    };
    for placement in hosted {
        let Ok(id) = placement.twin_id.parse::<TwinId>() else {
            continue;
        };
        let Ok(replies) = ctx
            .fabric
            .query(&keys::placement(&id), None, Duration::from_secs(2))
            .await
        else {
            continue;
        };
        if let Some(p) = replies
            .into_iter()
            .find_map(|r| Placement::decode(r.payload).ok())
        {
            if p.node != ctx.node.as_str() {
                let _ = node.cast(NodeMsg::PlacedElsewhere(p));
            }
        }
    }
}
