//! `NodeSupervisor`: one per node that hosts twins. It spawns the twins placed on its
//! node (from its own store at start-up — so an edge restarts its twins while the cloud is
//! down — and from the placement authority), restarts a crashed twin from its last
//! persisted state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio_util::sync::CancellationToken;

use crate::wire::TypedFabric;
use twinmesh_twins::proto::{Placement, PlacementQuery, TwinSummary};
use twinmesh_twins::Tier;
use twinmesh_twins::{keys, TwinId};

use crate::context::NodeContext;
use crate::mesh::{STATUS_ACTIVE, STATUS_STALE};
use crate::metrics::NodeMetrics;
use crate::ports::{PlacementStore, SampleKind};
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
    /// A frame or a call arrived for a twin that is dormant here: start it.
    Wake(TwinId),
    /// What the node hosts now, for tests and admin.
    Inspect(RpcReplyPort<NodeSnapshot>),
}

/// Observable state of a node supervisor.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    /// Twins hosted here (running or dormant), by id.
    pub twins: Vec<HostedTwin>,
    /// Twins given up on after failing `MAX_RESTARTS` times within `RESTART_WINDOW`: not
    /// restarted until they are placed here again.
    pub given_up: Vec<String>,
}

/// One twin hosted by a node.
#[derive(Debug, Clone, PartialEq)]
pub struct HostedTwin {
    pub twin_id: String,
    pub epoch: u64,
    /// Its actor is up.
    pub running: bool,
    /// Passivated: registered here, started on its next frame or call.
    pub dormant: bool,
    /// Restarts after a failure within the restart window.
    pub restarts: usize,
}

struct Hosted {
    actor: Option<ActorRef<TwinMsg>>,
    /// Shared with the twin's actor.
    placement: Arc<Placement>,
    restarts: Vec<Instant>,
}

/// Status of a dormant twin in listings and in the node's hosted records.
pub const STATUS_DORMANT: &str = "dormant";

#[derive(Clone, Copy)]
pub struct NodeSupervisor;

pub struct NodeSupervisorState {
    ctx: Arc<NodeContext>,
    /// The one store concern of the supervisor: the twins this node hosts.
    hosted: Arc<dyn PlacementStore>,
    twins: std::collections::BTreeMap<TwinId, Hosted>,
    by_actor: HashMap<ActorId, TwinId>,
    /// Twins that failed too often (observability: they are not hosted any more).
    given_up: std::collections::BTreeSet<TwinId>,
    cancel: CancellationToken,
}

/// A failed supervisor is not stopped (no `post_stop`): its state going away ends its
/// tasks (its twins die with it, and the next supervisor starts them from the store).
impl Drop for NodeSupervisorState {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl NodeSupervisorState {
    /// Forgets a twin this node no longer hosts (re-placed, unplaced, fenced), awake or
    /// dormant (the router keeps which twins are dormant).
    fn forget(&mut self, id: &TwinId, why: &str) {
        if let Some(h) = self.twins.remove(id) {
            if let Some(a) = h.actor {
                self.by_actor.remove(&a.get_id());
                a.stop(Some(why.into()));
            }
            self.ctx.router.forget(id);
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
                let placement = (*hosted.placement).clone();
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
            let mut record = (*hosted.placement).clone();
            record.status = STATUS_DORMANT.to_owned();
            if let Err(e) = self.hosted.save_hosted(&record) {
                tracing::warn!(twin = %id, "dormant record not stored: {e}");
            }
            NodeMetrics::add(&self.ctx.metrics.twins_passivated, 1);
            self.ctx.router.set_dormant(&id);
            self.ctx.directory.set_status(&id, STATUS_DORMANT);
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
            self.given_up.insert(id);
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
        // Started once per node: a restarted supervisor only points the waker at itself.
        if ctx.tier == Tier::Edge && !ctx.router.is_active() {
            // Frames, calls and delivery reports for the site's twins come through one
            // set of declarations, which also wakes dormant twins.
            ctx.router.start(&ctx).await?;
        }
        if ctx.tier == Tier::Edge {
            let node = myself.clone();
            ctx.router.set_waker(Box::new(move |id| {
                let _ = node.cast(NodeMsg::Wake(id));
            }));
        }
        let tasks = ctx.task_controller().child();
        let cancel = tasks.token().clone();
        // Placements published by the authority, and a full sync whenever a node (the
        // cloud among them) appears.
        let placements = ctx.fabric.subscribe(keys::PLACEMENT_ALL, 1024).await?;
        let members = ctx.fabric.liveliness_subscribe(keys::NODE_TOKENS).await?;
        tasks.spawn_until_cancelled(placement_watcher(
            myself.clone(),
            ctx.clone(),
            placements,
            members,
        ));
        Ok(NodeSupervisorState {
            hosted: ctx.store.clone(),
            ctx,
            twins: std::collections::BTreeMap::new(),
            by_actor: HashMap::new(),
            given_up: Default::default(),
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
        for mut placement in state.hosted.hosted()? {
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
                    placement: Arc::new(placement),
                    restarts: Vec::new(),
                },
            );
            dormant.push(id);
        }
        if !dormant.is_empty() {
            tracing::info!(twins = dormant.len(), "dormant twins registered");
            state.ctx.router.extend_dormant(&dormant);
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
                    let asleep = state.ctx.router.is_dormant(&id);
                    if h.placement.epoch >= placement.epoch && (h.actor.is_some() || asleep) {
                        return Ok(());
                    }
                }
                state.hosted.save_hosted(&placement)?;
                state.given_up.remove(&id);
                let restarts = state
                    .twins
                    .get_mut(&id)
                    .map(|h| std::mem::take(&mut h.restarts))
                    .unwrap_or_default();
                state.forget(&id, "re-placed");
                state.twins.insert(
                    id.clone(),
                    Hosted {
                        actor: None,
                        placement: Arc::new(placement),
                        restarts,
                    },
                );
                state.spawn_twin(&myself, id).await;
            }
            NodeMsg::Unplace(id) => {
                if state.twins.contains_key(&id) {
                    state.forget(&id, "unplaced");
                    state.hosted.remove_hosted(&id)?;
                    state.ctx.directory.remove(&id);
                }
            }
            NodeMsg::PlacedElsewhere(p) => {
                let Ok(id) = p.twin_id.parse::<TwinId>() else {
                    return Ok(());
                };
                // Placed on another node at a newer epoch. A `stale` placement (no live
                // node may host it) names no owner: the copy here runs on (an edge cut
                // off from the cloud) until the authority places the twin again.
                let stale = state.twins.get(&id).is_some_and(|h| {
                    h.placement.epoch < p.epoch
                        && p.status != STATUS_STALE
                        && !p.node.is_empty()
                        && p.node != state.ctx.node.as_str()
                });
                if stale {
                    tracing::warn!(twin = %id, epoch = p.epoch, owner = p.node, "twin placed elsewhere at a newer epoch: stopping the stale copy here");
                    state.forget(&id, "fenced");
                    state.hosted.remove_hosted(&id)?;
                    state.ctx.directory.remove(&id);
                }
            }
            NodeMsg::Wake(id) => {
                // The router has marked it waking and keeps its frames and calls until
                // it registers.
                let Some(record) = state
                    .twins
                    .get(&id)
                    .filter(|h| h.actor.is_none())
                    .map(|h| h.placement.clone())
                else {
                    return Ok(());
                };
                state.hosted.save_hosted(&record)?;
                tracing::debug!(twin = %id, "waking a dormant twin");
                NodeMetrics::add(&state.ctx.metrics.twins_woken, 1);
                state.spawn_twin(&myself, id).await;
            }
            NodeMsg::Lookup(id, reply) => {
                let _ = reply.send(state.twins.get(&id).and_then(|h| h.actor.clone()));
            }
            NodeMsg::Hosted(reply) => {
                let _ = reply.send(
                    state
                        .twins
                        .values()
                        .map(|h| (*h.placement).clone())
                        .collect(),
                );
            }
            NodeMsg::Inspect(reply) => {
                let twins = state
                    .twins
                    .iter()
                    .map(|(id, h)| HostedTwin {
                        twin_id: id.to_string(),
                        epoch: h.placement.epoch,
                        running: h.actor.is_some(),
                        dormant: h.actor.is_none() && state.ctx.router.is_dormant(id),
                        restarts: h.restarts.len(),
                    })
                    .collect();
                let given_up = state.given_up.iter().map(|id| id.to_string()).collect();
                let _ = reply.send(NodeSnapshot { twins, given_up });
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

/// How often a node asks the authority where its twins are even when nothing changed
/// (anti-entropy): a stale copy left by a placement missed while the node was frozen or
/// cut off, or by a reconcile that went out before the routes to the authority were
/// back, stops within this time.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Feeds the supervisor with placements: live publications, a full sync whenever a node
/// joins (the authority may be the one that joined), and a [`reconcile`] every
/// [`RECONCILE_EVERY`]. (Not a periodic pull: that would restart, every few seconds, a
/// twin the supervisor gave up on after repeated failures.)
async fn placement_watcher(
    node: ActorRef<NodeMsg>,
    ctx: Arc<NodeContext>,
    placements: crate::ports::Subscription,
    members: crate::ports::Subscription,
) {
    let mut periodic = tokio::time::interval(RECONCILE_EVERY);
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    periodic.reset();
    loop {
        tokio::select! {
            biased;
            s = placements.rx.recv_async() => {
                let Ok(s) = s else { break };
                match s.decode::<Placement>().map(|p| proven_placement(&ctx, p)) {
                    // Only the placement authority's word moves twins.
                    Ok(None) => {}
                    Ok(Some(p)) if p.node == ctx.node.as_str() && p.status != STATUS_STALE => {
                        let _ = node.cast(NodeMsg::Place(p));
                    }
                    Ok(Some(p)) => {
                        let _ = node.cast(NodeMsg::PlacedElsewhere(p));
                    }
                    Err(e) => tracing::warn!(key = s.key, "malformed placement: {e}"),
                }
            }
            s = members.rx.recv_async() => {
                let Ok(s) = s else { break };
                if s.kind == SampleKind::Put {
                    resync_placements(&node, &ctx).await;
                    periodic.reset();
                }
            }
            _ = periodic.tick() => reconcile(&node, &ctx).await,
        }
    }
}

/// Pulls the placements the authority holds for this node (twins placed here start),
/// then [`reconcile`]s the twins hosted here.
async fn resync_placements(node: &ActorRef<NodeMsg>, ctx: &NodeContext) {
    let query = PlacementQuery {
        node: ctx.node.to_string(),
        twins: Vec::new(),
    };
    match query_placements(ctx, query).await {
        Ok(placements) => {
            for p in placements {
                let _ = node.cast(NodeMsg::Place(p));
            }
        }
        Err(e) => tracing::debug!("placement pull failed: {e}"),
    }
    reconcile(node, ctx).await;
}

async fn query_placements(
    ctx: &NodeContext,
    query: PlacementQuery,
) -> crate::Result<Vec<Placement>> {
    let replies = ctx
        .fabric
        .ask(keys::PLACEMENT_ALL, &query, Duration::from_secs(5))
        .await?;
    Ok(replies
        .into_iter()
        .filter_map(|r| r.decode::<Placement>().ok())
        .filter_map(|p| proven_placement(ctx, p))
        .collect())
}

/// `p` if the placement authority proved it (under the control key of the twin's site);
/// a forged placement would stop or start twins here.
fn proven_placement(ctx: &NodeContext, mut p: Placement) -> Option<Placement> {
    let site = p.twin_id.split('/').next()?.to_owned();
    if ctx.trust.proven(&site, &mut p).is_some() {
        Some(p)
    } else {
        NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
        tracing::warn!(
            twin = p.twin_id,
            "dropped a placement without the authority's proof"
        );
        None
    }
}

/// Asks the authority, in one query, where the twins hosted here are placed: copies it
/// placed elsewhere at a newer epoch stop. Twins it does not answer for (authority
/// unreachable) are kept: an edge cut off from the cloud runs on.
async fn reconcile(node: &ActorRef<NodeMsg>, ctx: &NodeContext) {
    let Ok(ractor::rpc::CallResult::Success(hosted)) = node
        .call(NodeMsg::Hosted, Some(Duration::from_secs(5)))
        .await
    else {
        return;
    };
    if hosted.is_empty() {
        return;
    }
    let query = PlacementQuery {
        node: String::new(),
        twins: hosted.into_iter().map(|p| p.twin_id).collect(),
    };
    match query_placements(ctx, query).await {
        Ok(placements) => {
            for p in placements
                .into_iter()
                .filter(|p| p.node != ctx.node.as_str())
            {
                let _ = node.cast(NodeMsg::PlacedElsewhere(p));
            }
        }
        Err(e) => tracing::debug!("reconcile query failed: {e}"),
    }
}
