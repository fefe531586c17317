//! `MeshSupervisor`: the placement authority, on the cloud node. It tracks membership from
//! Zenoh liveliness, keeps the placement table (with epochs) in the store, registers
//! assets announced by gateways, places each twin, and answers `twinmesh/placement/**`.
//!
//! Placement policy (DESIGN §7): feasible nodes first — edges of the twin's own site, and
//! the cloud node only when every signal of its kind is public (raw data may leave the
//! site) — then the least loaded, within capacity; draining nodes take no twins. With no
//! feasible node the placement is `stale` (with the reason) until one joins. Every change
//! of owner increments the epoch. When a node's liveliness token goes away, its twins are
//! placed again (failover); the new owner starts from the newest replicated snapshot,
//! which this supervisor keeps (refusing snapshots of older epochs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use crate::wire::TypedFabric;
use twinmesh_twins::privacy::Ledger;
use twinmesh_twins::proto::{
    self, mesh_reply, mesh_request, twin_reply, twin_request, Budget, DrainNodeResponse,
    FreezeRequest, MeshReply, MeshRequest, MigrateTwinResponse, NodeInfo, Placement,
    PlacementQuery, PlacementRequest, SiteBudgetRequest, TwinReply, TwinRequest, TwinSnapshot,
};
use twinmesh_twins::{keys, AssetKind, Error as DomainError, ErrorCode, Tier, TwinId};

use crate::context::NodeContext;
use crate::metrics::NodeMetrics;
use crate::ports::{Qos, Query, SampleKind};

pub const STATUS_ACTIVE: &str = "active";
/// How long after a join the rebalancer looks for moves.
pub const REBALANCE_WINDOW: Duration = Duration::from_secs(60);
/// How often kept snapshots are flushed.
pub const REPLICA_FLUSH: Duration = Duration::from_millis(500);
/// At most one rebalancing move per this period.
pub const REBALANCE_PERIOD: Duration = Duration::from_secs(2);
pub const STATUS_STALE: &str = "stale";

pub enum MeshMsg {
    NodeUp(NodeInfo),
    NodeDown(String),
    /// Where a twin would move: its placement and the target node.
    PlanMove {
        twin: TwinId,
        target_node: String,
        target_tier: String,
        reply: RpcReplyPort<Result<(Placement, NodeInfo), crate::Error>>,
    },
    /// Place a (frozen) twin on `node` with the next epoch: refused when its placement
    /// is no longer at `epoch`, or when `deadline` (its freeze's expiry) passed before the
    /// record was durable. `pin`: an operator's move (rebalancing leaves it alone).
    CommitMove {
        twin: TwinId,
        node: NodeInfo,
        epoch: u64,
        deadline: tokio::time::Instant,
        pin: bool,
        reply: RpcReplyPort<Result<Placement, crate::Error>>,
    },
    /// An operator unpins a twin: rebalancing may move it again.
    Unpin(TwinId, RpcReplyPort<Result<Placement, crate::Error>>),
    /// Mark a node as draining and list the twins on it.
    StartDrain(String, RpcReplyPort<Result<Vec<Placement>, crate::Error>>),
    /// A move the rebalancer suggests (most to least loaded edge of a site), if any.
    SuggestMove(RpcReplyPort<Option<TwinId>>),
    /// A snapshot to keep, synchronously (migration).
    KeepReplica(TwinSnapshot, RpcReplyPort<()>),
    /// Make kept snapshots durable (periodic).
    FlushReplicas,
    /// A twin's replicated snapshot.
    Replica(TwinSnapshot),
    Register(
        PlacementRequest,
        RpcReplyPort<Result<Placement, DomainError>>,
    ),
    Get(TwinId, RpcReplyPort<Option<Placement>>),
    /// The placements a [`PlacementQuery`] asks for.
    Matching(PlacementQuery, RpcReplyPort<Vec<Placement>>),
    Members(RpcReplyPort<Vec<NodeInfo>>),
    /// Reserve, refund or read ε in a site's ledger of set releases.
    SiteBudget(
        SiteBudgetRequest,
        RpcReplyPort<Result<Budget, crate::Error>>,
    ),
    /// What the authority knows now, for tests and admin.
    Inspect(RpcReplyPort<MeshSnapshot>),
}

/// Observable state of the placement authority.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshSnapshot {
    /// Live nodes, by name.
    pub members: Vec<NodeInfo>,
    /// Every placement, by twin.
    pub placements: Vec<Placement>,
    /// Nodes being drained.
    pub draining: Vec<String>,
    /// Active twins placed on each live node (the load placement compares).
    pub load: BTreeMap<String, usize>,
    /// Replicated snapshots refused because they came from an older epoch (fencing).
    pub fenced_replicas: u64,
}

/// How long a set release's charge of its site ledger can be refunded.
const OPEN_CHARGE_NS: i64 = 10 * 60 * 1_000_000_000;

#[derive(Clone, Copy)]
pub struct MeshSupervisor;

pub struct MeshState {
    ctx: Arc<NodeContext>,
    members: BTreeMap<String, NodeInfo>,
    placements: BTreeMap<TwinId, Placement>,
    /// Each site's ε ledger of set releases (durable in the store).
    site_ledgers: BTreeMap<String, Ledger>,
    /// What each open set release charged a site, by (site, release id): a refund gives
    /// back at most that, once (a forged refund of any ε cannot reset a ledger).
    /// Entries older than [`OPEN_CHARGE_NS`] are forgotten (the release is over).
    site_charges: BTreeMap<(String, String), (f64, f64, i64)>,
    /// Nodes being drained: no new twins.
    draining: std::collections::BTreeSet<String>,
    /// Rebalancing runs for a while after a node joins.
    rebalance_until: Option<tokio::time::Instant>,
    /// Snapshots kept since the last flush.
    replicas_dirty: bool,
    /// Snapshots refused as coming from an older epoch.
    fenced_replicas: u64,
    flush_timer: Option<ractor::concurrency::JoinHandle<()>>,
    cancel: CancellationToken,
}

/// A failed authority is not stopped (no `post_stop`): its state going away ends its
/// tasks and declarations, so the one its keeper starts next is the only one.
impl Drop for MeshState {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.flush_timer.take() {
            t.abort();
        }
    }
}

impl MeshState {
    /// The best feasible node for `p`, never `exclude`: an edge of its site, else the
    /// cloud when its data may leave the site; the least loaded within capacity.
    fn choose_node(&self, p: &Placement, exclude: Option<&str>) -> Option<&NodeInfo> {
        let feasible = self.feasible(p, exclude);
        let least = |tier: Tier| {
            feasible
                .iter()
                .filter(|n| n.tier == tier.as_str())
                .min_by_key(|n| (self.load(&n.node), n.node.clone()))
                .copied()
        };
        least(Tier::Edge).or_else(|| least(Tier::Cloud))
    }

    fn place(&self, placement: Placement) -> Placement {
        self.place_excluding(placement, None)
    }

    /// Places `placement` again; a change of owner (including to none) bumps the epoch.
    fn place_excluding(&self, mut placement: Placement, exclude: Option<&str>) -> Placement {
        match self.choose_node(&placement, exclude) {
            Some(node) => {
                if placement.node != node.node || placement.status != STATUS_ACTIVE {
                    placement.epoch += 1;
                }
                placement.node = node.node.clone();
                placement.tier = node.tier.clone();
                placement.status = STATUS_ACTIVE.to_owned();
                placement.reason.clear();
            }
            None => {
                if placement.status == STATUS_ACTIVE {
                    placement.epoch += 1;
                }
                placement.node.clear();
                placement.tier.clear();
                placement.status = STATUS_STALE.to_owned();
                placement.reason = format!(
                    "no live node may host it: its raw data must stay on site {} and no edge node of that site is up",
                    placement.site
                );
                if cloud_eligible(&placement) {
                    placement.reason = format!(
                        "no live node may host it: no edge node of site {} and no cloud node is up",
                        placement.site
                    );
                } else if kind_public(&placement) {
                    // Only its current policy keeps it on its site.
                    placement.reason = format!(
                        "no live node may host it: its policy keeps raw data on site {} and no edge node of that site is up",
                        placement.site
                    );
                }
            }
        }
        placement
    }

    /// Validates a requested move and picks its target.
    fn plan_move(
        &self,
        twin: &TwinId,
        target_node: &str,
        target_tier: &str,
    ) -> Result<(Placement, NodeInfo), crate::Error> {
        let p = self.placements.get(twin).ok_or_else(|| {
            crate::Error::refused(ErrorCode::NotFound, format!("unknown twin {twin}"))
        })?;
        if p.status != STATUS_ACTIVE {
            return Err(crate::Error::refused(
                ErrorCode::FailedPrecondition,
                format!("twin {twin} is stale: {}", p.reason),
            ));
        }
        let target = if target_node.is_empty() && target_tier.is_empty() {
            self.choose_node(p, Some(&p.node)).cloned().ok_or_else(|| {
                crate::Error::refused(
                    ErrorCode::FailedPrecondition,
                    format!("no other node may host {twin} (site, privacy, capacity or draining)"),
                )
            })?
        } else if !target_node.is_empty() {
            let n = self.members.get(target_node).ok_or_else(|| {
                crate::Error::refused(ErrorCode::NotFound, format!("unknown node {target_node}"))
            })?;
            if n.node == p.node {
                return Err(crate::Error::refused(
                    ErrorCode::FailedPrecondition,
                    format!("twin {twin} is on {target_node} already"),
                ));
            }
            // The target must be one the placement policy allows.
            let allowed = self
                .feasible(p, Some(&p.node))
                .into_iter()
                .any(|f| f.node == n.node);
            if !allowed {
                return Err(crate::Error::refused(ErrorCode::FailedPrecondition,
                    format!("node {target_node} may not host {twin} (site, privacy, capacity or draining)"),));
            }
            n.clone()
        } else {
            let tier: Tier = target_tier.parse().map_err(|e: twinmesh_twins::Error| {
                crate::Error::refused(ErrorCode::InvalidArgument, e.to_string())
            })?;
            self.feasible(p, Some(&p.node))
                .into_iter()
                .filter(|n| n.tier == tier.as_str())
                .min_by_key(|n| (self.load(&n.node), n.node.clone()))
                .cloned()
                .ok_or_else(|| {
                    crate::Error::refused(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "no {tier} node may host {twin} (site, privacy, capacity or draining)"
                        ),
                    )
                })?
        };
        Ok((p.clone(), target))
    }

    fn inspect(&self) -> MeshSnapshot {
        MeshSnapshot {
            members: self.members.values().cloned().collect(),
            placements: self.placements.values().cloned().collect(),
            draining: self.draining.iter().cloned().collect(),
            load: self
                .members
                .keys()
                .map(|n| (n.clone(), self.load(n)))
                .collect(),
            fenced_replicas: self.fenced_replicas,
        }
    }

    /// Active twins placed on `node`.
    fn load(&self, node: &str) -> usize {
        self.placements
            .values()
            .filter(|q| q.node == node && q.status == STATUS_ACTIVE)
            .count()
    }

    /// Every node the policy allows for `p`, except `exclude`.
    fn feasible(&self, p: &Placement, exclude: Option<&str>) -> Vec<&NodeInfo> {
        let public = cloud_eligible(p);
        self.members
            .values()
            .filter(|n| Some(n.node.as_str()) != exclude && !self.draining.contains(&n.node))
            .filter(|n| n.capacity == 0 || self.load(&n.node) < n.capacity as usize)
            .filter(|n| {
                (n.tier == Tier::Edge.as_str() && n.site == p.site)
                    || (public && n.tier == Tier::Cloud.as_str())
            })
            .collect()
    }

    /// Gradual rebalancing after a join: first a twin that fell back to the cloud while
    /// its site had no edge (site affinity), then one from the most to the least loaded
    /// edge of a site when they differ by more than one.
    fn suggest_move(&self) -> Option<TwinId> {
        if self
            .rebalance_until
            .is_none_or(|t| tokio::time::Instant::now() > t)
        {
            return None;
        }
        let home = self.placements.iter().find(|(_, p)| {
            p.status == STATUS_ACTIVE
                && !p.pinned
                && p.tier == Tier::Cloud.as_str()
                && self
                    .feasible(p, Some(&p.node))
                    .iter()
                    .any(|n| n.tier == Tier::Edge.as_str())
        });
        if let Some((id, _)) = home {
            return Some(id.clone());
        }
        let edges: Vec<&NodeInfo> = self
            .members
            .values()
            .filter(|n| n.tier == Tier::Edge.as_str() && !self.draining.contains(&n.node))
            .collect();
        for site in edges
            .iter()
            .map(|n| n.site.clone())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let in_site: Vec<&&NodeInfo> = edges.iter().filter(|n| n.site == site).collect();
            let most = in_site
                .iter()
                .max_by_key(|n| (self.load(&n.node), n.node.clone()))?;
            let least = in_site
                .iter()
                .min_by_key(|n| (self.load(&n.node), n.node.clone()))?;
            if self.load(&most.node) > self.load(&least.node) + 1 {
                return self
                    .placements
                    .iter()
                    .find(|(_, p)| p.node == most.node && p.status == STATUS_ACTIVE && !p.pinned)
                    .map(|(id, _)| id.clone());
            }
        }
        None
    }

    /// One step of a site's ledger: a reservation is refused, spending nothing, when it
    /// does not fit; every change is durable before the answer.
    async fn site_budget(&mut self, req: SiteBudgetRequest) -> Result<Budget, crate::Error> {
        if let Err(e) = twinmesh_twins::id::validate_site(&req.site) {
            return Err(crate::Error::refused(
                ErrorCode::InvalidArgument,
                e.to_string(),
            ));
        }
        let valid = |x: f64| x.is_finite() && x >= 0.0;
        if !(valid(req.epsilon) && valid(req.delta)) {
            return Err(crate::Error::refused(
                ErrorCode::InvalidArgument,
                format!(
                    "site budget request with ε {} and δ {}: both must be finite and not negative",
                    req.epsilon, req.delta
                ),
            ));
        }
        let allowance = self.ctx.twin_config.site_budget;
        let now = self.ctx.now_ns();
        let mut ledger = self
            .site_ledgers
            .get(&req.site)
            .copied()
            .unwrap_or_default();
        ledger.roll_every(allowance.period_ns, now);
        let key = (req.site.clone(), req.release_id.clone());
        self.site_charges
            .retain(|_, (_, _, at)| now.saturating_sub(*at) < OPEN_CHARGE_NS);
        let changed = if req.refund {
            let Some((epsilon, delta, _)) = self.site_charges.remove(&key) else {
                return Err(crate::Error::refused(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "no open charge of release {:?} on site {}: nothing to refund",
                        req.release_id, req.site
                    ),
                ));
            };
            ledger.refund(req.epsilon.min(epsilon), req.delta.min(delta));
            true
        } else if req.epsilon > 0.0 {
            ledger
                .check_of(
                    &format!("site {}", req.site),
                    allowance.epsilon_per_period,
                    req.epsilon,
                )
                .map_err(|e| crate::Error::refused(ErrorCode::FailedPrecondition, e.to_string()))?;
            ledger.charge(req.epsilon, req.delta);
            let open = self.site_charges.entry(key).or_insert((0.0, 0.0, now));
            open.0 += req.epsilon;
            open.1 += req.delta;
            true
        } else {
            false
        };
        let budget = Budget {
            site: req.site.clone(),
            epsilon_total: allowance.epsilon_per_period,
            epsilon_spent: ledger.epsilon_spent,
            period_start_ns: ledger.period_start_ns,
            releases: ledger.releases,
            delta_spent: ledger.delta_spent,
            ..Default::default()
        };
        if changed {
            let store = |e: crate::Error| {
                crate::Error::refused(ErrorCode::Internal, format!("site ledger: {e}"))
            };
            self.ctx.store.save_site_budget(&budget).map_err(store)?;
            self.ctx.store.flush().await.map_err(store)?;
            self.site_ledgers.insert(req.site.clone(), ledger);
            tracing::info!(
                site = req.site,
                release = req.release_id,
                epsilon = req.epsilon,
                refund = req.refund,
                spent = ledger.epsilon_spent,
                "site ledger"
            );
        }
        Ok(budget)
    }

    /// Records what a twin's replicated snapshot says of its current policy (durable
    /// with the next flush of replicas): placement follows it, not the kind's defaults.
    fn note_policy(&mut self, snapshot: &TwinSnapshot) -> crate::Result<()> {
        let Some(id) = snapshot
            .twin
            .as_ref()
            .and_then(|t| t.twin_id.parse::<TwinId>().ok())
        else {
            return Ok(());
        };
        let Some(p) = self.placements.get_mut(&id) else {
            return Ok(());
        };
        if p.site_only != snapshot.site_only {
            p.site_only = snapshot.site_only;
            tracing::info!(twin = %id, site_only = p.site_only, "placement follows the twin's policy");
            // Changed: proven anew, or nodes would drop it.
            self.ctx.trust.prove(id.site(), p);
            self.ctx.store.save_placement(p)?;
            self.replicas_dirty = true;
        }
        Ok(())
    }

    /// A move of a frozen twin to `node` at the next epoch, unless its placement moved on
    /// meanwhile or its freeze expired (the twin then runs on where it was: a late
    /// commit would start the target from a snapshot older than what the source acked).
    async fn commit_move(
        &mut self,
        twin: &TwinId,
        node: &NodeInfo,
        epoch: u64,
        deadline: tokio::time::Instant,
        pin: bool,
    ) -> Result<Placement, crate::Error> {
        let before = self.placements.get(twin).cloned().ok_or_else(|| {
            crate::Error::refused(ErrorCode::NotFound, format!("unknown twin {twin}"))
        })?;
        if before.epoch != epoch || before.status != STATUS_ACTIVE {
            return Err(crate::Error::refused(
                ErrorCode::FailedPrecondition,
                format!(
                    "twin {twin} moved on during the migration (epoch {} now, {epoch} frozen)",
                    before.epoch
                ),
            ));
        }
        let expired = || {
            crate::Error::refused(
                ErrorCode::FailedPrecondition,
                format!(
                    "the freeze of {twin} at epoch {epoch} expired before the move was committed"
                ),
            )
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(expired());
        }
        let mut p = before.clone();
        p.epoch += 1;
        p.node = node.node.clone();
        p.tier = node.tier.clone();
        p.status = STATUS_ACTIVE.to_owned();
        p.reason.clear();
        p.pinned = pin;
        let unstored =
            |e: crate::Error| crate::Error::unavailable(format!("placement not stored: {e}"));
        self.ctx.store.save_placement(&p).map_err(unstored)?;
        self.ctx.store.flush().await.map_err(unstored)?;
        if tokio::time::Instant::now() >= deadline {
            // Durable too late: the twin unfroze where it was. Nobody saw the new record.
            self.ctx.store.save_placement(&before).map_err(unstored)?;
            self.ctx.store.flush().await.map_err(unstored)?;
            return Err(expired());
        }
        self.commit(p.clone()).await.map_err(unstored)?;
        Ok(p)
    }

    async fn commit(&mut self, mut placement: Placement) -> crate::Result<()> {
        let id: TwinId = placement.twin_id.parse()?;
        // Gateways take a twin's owner and epoch only from a proven placement.
        self.ctx.trust.prove(id.site(), &mut placement);
        self.ctx.store.save_placement(&placement)?;
        self.ctx.store.flush().await?;
        self.ctx
            .fabric
            .put(&keys::placement(&id), &placement, Qos::Reliable)
            .await?;
        tracing::info!(twin = %id, node = placement.node, epoch = placement.epoch, status = placement.status, "placement");
        self.placements.insert(id, placement);
        Ok(())
    }
}

impl Actor for MeshSupervisor {
    type Msg = MeshMsg;
    type State = MeshState;
    type Arguments = Arc<NodeContext>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<NodeContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut placements = BTreeMap::new();
        for p in ctx.store.placements()? {
            if let Ok(id) = p.twin_id.parse::<TwinId>() {
                placements.insert(id, p);
            }
        }
        let site_ledgers = ctx
            .store
            .site_budgets()?
            .into_iter()
            .map(|b| (b.site.clone(), Ledger::from_proto(&b)))
            .collect();
        let tasks = ctx.task_controller().child();
        let cancel = tasks.token().clone();
        let members = ctx.fabric.liveliness_subscribe(keys::NODE_TOKENS).await?;
        let queryable = ctx.fabric.queryable(keys::PLACEMENT_ALL, 1024).await?;
        let requests = ctx.fabric.queryable(keys::MESH_REQUESTS, 64).await?;
        tasks.spawn_until_cancelled(mesh_request_server(myself.clone(), ctx.clone(), requests));
        tasks.spawn_until_cancelled(rebalancer(myself.clone(), ctx.clone()));
        let replicas = ctx.fabric.subscribe(keys::SNAPSHOTS_ALL, 4096).await?;
        let replica_queries = ctx.fabric.queryable(keys::SNAPSHOTS_ALL, 1024).await?;
        tasks.spawn_until_cancelled(replica_keeper(
            myself.clone(),
            ctx.clone(),
            replicas,
            replica_queries,
        ));
        tasks.spawn_until_cancelled(membership_watcher(myself.clone(), ctx.clone(), members));
        tasks.spawn_until_cancelled(placement_server(myself.clone(), ctx.clone(), queryable));
        tracing::info!(placements = placements.len(), "placement authority started");
        Ok(MeshState {
            ctx,
            members: BTreeMap::new(),
            placements,
            site_ledgers,
            site_charges: BTreeMap::new(),
            draining: Default::default(),
            rebalance_until: None,
            replicas_dirty: false,
            fenced_replicas: 0,
            flush_timer: None,
            cancel,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Replicas become durable within half a second (a crashed cloud must not roll
        // twins back further than that).
        state.flush_timer = Some(myself.send_interval(REPLICA_FLUSH, || MeshMsg::FlushReplicas));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.cancel.cancel();
        if let Some(t) = state.flush_timer.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MeshMsg::NodeUp(info) => {
                tracing::info!(
                    node = info.node,
                    tier = info.tier,
                    site = info.site,
                    "node joined"
                );
                let site = info.site.clone();
                state.members.insert(info.node.clone(), info);
                // Twins of this site that had nowhere to go get a home now.
                let _ = site;
                state.rebalance_until = Some(tokio::time::Instant::now() + REBALANCE_WINDOW);
                let waiting: Vec<Placement> = state
                    .placements
                    .values()
                    .filter(|p| p.status == STATUS_STALE)
                    .cloned()
                    .collect();
                for p in waiting {
                    let placed = state.place(p);
                    if placed.status == STATUS_ACTIVE {
                        state.commit(placed).await?;
                    }
                }
            }
            MeshMsg::NodeDown(node) => {
                if state.members.remove(&node).is_some() {
                    tracing::info!(node, "node left");
                }
                state.draining.remove(&node);
                // Failover: its twins go elsewhere (epoch + 1), or become stale.
                let orphans: Vec<Placement> = state
                    .placements
                    .values()
                    .filter(|p| p.node == node && p.status == STATUS_ACTIVE)
                    .cloned()
                    .collect();
                for p in orphans {
                    // Its node failed: an operator's pin ends with it.
                    let placed =
                        state.place_excluding(Placement { pinned: false, ..p }, Some(&node));
                    tracing::warn!(
                        twin = placed.twin_id,
                        from = node,
                        to = placed.node,
                        epoch = placed.epoch,
                        status = placed.status,
                        "failover"
                    );
                    let span = tracing::debug_span!(
                        "mesh.failover",
                        twin = %placed.twin_id,
                        from = %node,
                        to = %placed.node
                    );
                    tracing::Instrument::instrument(state.commit(placed), span).await?;
                }
            }
            MeshMsg::PlanMove {
                twin,
                target_node,
                target_tier,
                reply,
            } => {
                let _ = reply.send(state.plan_move(&twin, &target_node, &target_tier));
            }
            MeshMsg::CommitMove {
                twin,
                node,
                epoch,
                deadline,
                pin,
                reply,
            } => {
                let result = state.commit_move(&twin, &node, epoch, deadline, pin).await;
                let _ = reply.send(result);
            }
            MeshMsg::Unpin(twin, reply) => {
                let result = match state.placements.get(&twin).cloned() {
                    Some(p) => {
                        let p = Placement { pinned: false, ..p };
                        state.commit(p.clone()).await.map(|()| p).map_err(|e| {
                            crate::Error::unavailable(format!("placement not stored: {e}"))
                        })
                    }
                    None => Err(crate::Error::refused(
                        ErrorCode::NotFound,
                        format!("unknown twin {twin}"),
                    )),
                };
                let _ = reply.send(result);
            }
            MeshMsg::StartDrain(node, reply) => {
                let result = if state.members.contains_key(&node) {
                    state.draining.insert(node.clone());
                    tracing::info!(node, "draining");
                    Ok(state
                        .placements
                        .values()
                        .filter(|p| p.node == node && p.status == STATUS_ACTIVE)
                        .cloned()
                        .collect())
                } else {
                    Err(crate::Error::refused(
                        ErrorCode::NotFound,
                        format!("unknown node {node}"),
                    ))
                };
                let _ = reply.send(result);
            }
            MeshMsg::SuggestMove(reply) => {
                let _ = reply.send(state.suggest_move());
            }
            MeshMsg::KeepReplica(mut snapshot, reply) => {
                // The Freeze reply may come from anyone who answers the twin's key: kept
                // only when its owner at its epoch proved it.
                let id = snapshot
                    .twin
                    .as_ref()
                    .and_then(|t| t.twin_id.parse::<TwinId>().ok());
                let sender = state.ctx.trust.proven_mesh(&mut snapshot);
                let owner = id
                    .as_ref()
                    .and_then(|id| state.placements.get(id))
                    .map(|p| (p.node.clone(), p.epoch));
                if sender.is_none() || owner != sender.map(|n| (n, snapshot.epoch)) {
                    NodeMetrics::add(&state.ctx.metrics.messages_malformed, 1);
                    tracing::warn!(twin = ?id, "refusing a hand-over snapshot not proven by the twin's owner at its epoch");
                    let _ = reply.send(());
                    return Ok(());
                }
                if let Err(e) = state.ctx.store.save_replica(&snapshot) {
                    tracing::warn!("snapshot not kept: {e}");
                }
                if let Err(e) = state.note_policy(&snapshot) {
                    tracing::warn!("placement not updated to the twin's policy: {e}");
                }
                let _ = reply.send(());
            }
            MeshMsg::FlushReplicas => {
                if std::mem::take(&mut state.replicas_dirty) {
                    state.ctx.store.flush().await?;
                }
            }
            MeshMsg::Replica(snapshot) => {
                let Some(id) = snapshot
                    .twin
                    .as_ref()
                    .and_then(|t| t.twin_id.parse::<TwinId>().ok())
                else {
                    return Ok(());
                };
                // Only the twin's owner at its epoch replicates it: an older owner may
                // not overwrite the newer state, and no other node may write it at all.
                let sender = snapshot.proof.as_ref().map(|p| p.node.as_str());
                match state.placements.get(&id) {
                    Some(p) if snapshot.epoch < p.epoch => {
                        state.fenced_replicas += 1;
                        tracing::debug!(twin = %id, epoch = snapshot.epoch, current = p.epoch, "refusing a snapshot of an older epoch");
                        return Ok(());
                    }
                    Some(p) if snapshot.epoch == p.epoch && sender == Some(p.node.as_str()) => {}
                    _ => {
                        NodeMetrics::add(&state.ctx.metrics.messages_malformed, 1);
                        tracing::warn!(twin = %id, epoch = snapshot.epoch, from = ?sender, "refusing a replica not sent by the twin's owner at its epoch");
                        return Ok(());
                    }
                }
                if state.ctx.store.save_replica(&snapshot)? {
                    state.replicas_dirty = true;
                    state.note_policy(&snapshot)?;
                }
            }
            MeshMsg::Register(req, reply) => {
                let result = async {
                    let id: TwinId = req.twin_id.parse()?;
                    // A Thing Model is checked on every registration that carries one,
                    // placed twin or not: a conflicting definition is refused, never
                    // ignored.
                    if !req.thing_model.is_empty() {
                        crate::kinds::learn(
                            state.ctx.store.as_ref(),
                            id.site(),
                            &req.kind,
                            &req.thing_model,
                        )
                        .map_err(|e| match e {
                            crate::Error::Domain(d) => d,
                            other => DomainError::InvalidArgument(other.to_string()),
                        })?;
                    }
                    if let Some(p) = state.placements.get(&id) {
                        return Ok(p.clone());
                    }
                    let kind: AssetKind = req.kind.parse()?;
                    let placement = state.place(Placement {
                        twin_id: id.to_string(),
                        node: String::new(),
                        tier: String::new(),
                        epoch: 0,
                        kind: kind.to_string(),
                        site: id.site().to_owned(),
                        status: String::new(),
                        reason: String::new(),
                        initial_chain: req.chain.clone(),
                        proof: None,
                        pinned: false,
                        site_only: false,
                    });
                    state.commit(placement.clone()).await.map_err(|e| {
                        DomainError::InvalidArgument(format!("placement not stored: {e}"))
                    })?;
                    Ok(placement)
                }
                .await;
                let _ = reply.send(result);
            }
            MeshMsg::Get(id, reply) => {
                let _ = reply.send(state.placements.get(&id).cloned());
            }
            MeshMsg::Matching(query, reply) => {
                let found = if query.twins.is_empty() {
                    state
                        .placements
                        .values()
                        .filter(|p| query.node.is_empty() || p.node == query.node)
                        .cloned()
                        .collect()
                } else {
                    query
                        .twins
                        .iter()
                        .filter_map(|t| t.parse::<TwinId>().ok())
                        .filter_map(|id| state.placements.get(&id).cloned())
                        .collect()
                };
                let _ = reply.send(found);
            }
            MeshMsg::Members(reply) => {
                let _ = reply.send(state.members.values().cloned().collect());
            }
            MeshMsg::SiteBudget(req, reply) => {
                let _ = reply.send(state.site_budget(req).await);
            }
            MeshMsg::Inspect(reply) => {
                let _ = reply.send(state.inspect());
            }
        }
        Ok(())
    }
}

async fn membership_watcher(
    mesh: ActorRef<MeshMsg>,
    ctx: Arc<NodeContext>,
    members: crate::ports::Subscription,
) {
    loop {
        let Ok(sample) = members.rx.recv_async().await else {
            break;
        };
        let Some(node) = keys::parse_node_token(&sample.key) else {
            continue;
        };
        match sample.kind {
            SampleKind::Delete => {
                let _ = mesh.cast(MeshMsg::NodeDown(node.to_owned()));
            }
            SampleKind::Put => {
                let Ok(node_id) = node.parse() else { continue };
                // The token comes first; the info queryable may need a moment.
                for attempt in 0..10u32 {
                    let replies = ctx
                        .fabric
                        .query(&keys::node_info(&node_id), None, Duration::from_secs(2))
                        .await;
                    if let Some(info) = replies
                        .ok()
                        .and_then(|r| r.into_iter().next())
                        .and_then(|r| r.decode::<NodeInfo>().ok())
                    {
                        match member(&ctx, node, info) {
                            Some(info) => {
                                let _ = mesh.cast(MeshMsg::NodeUp(info));
                            }
                            None => {
                                NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
                                tracing::warn!(node, "ignoring a node whose info names another node, or that claims a tier it cannot prove");
                            }
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
                }
            }
        }
    }
}

async fn placement_server(
    mesh: ActorRef<MeshMsg>,
    ctx: Arc<NodeContext>,
    queryable: crate::ports::Queryable,
) {
    loop {
        let Ok(query) = queryable.rx.recv_async().await else {
            break;
        };
        // A call that timed out (the authority busy, e.g. on a slow disk) loses one
        // answer; only an authority that is gone ends the queryable.
        if serve_placement_query(&mesh, &ctx, query).await.is_err()
            && matches!(
                mesh.get_status(),
                ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
            )
        {
            break;
        }
    }
}

async fn serve_placement_query(
    mesh: &ActorRef<MeshMsg>,
    ctx: &NodeContext,
    query: Query,
) -> Result<(), ()> {
    let timeout = Some(Duration::from_secs(5));
    let one = |p: &Placement| {
        (
            keys::placement(&p.twin_id.parse().expect("stored ids are valid")),
            p.clone(),
        )
    };
    match keys::parse_twin_in(&query.key, "placement") {
        // A concrete twin: read, or register when the payload says so.
        Some(id) if !query.key.contains('*') => {
            let placement = if query.payload.is_empty() {
                match mesh.call(|tx| MeshMsg::Get(id, tx), timeout).await {
                    Ok(ractor::rpc::CallResult::Success(p)) => p,
                    _ => return Err(()),
                }
            } else {
                let Ok(mut req) = query.decode::<PlacementRequest>() else {
                    tracing::warn!(key = query.key, "malformed placement request");
                    return Ok(());
                };
                // The twin is the key's (which the access-control list lets only the
                // site's gateways query), never the payload's.
                if req.twin_id != id.to_string() {
                    tracing::warn!(
                        key = query.key,
                        claimed = req.twin_id,
                        "registration refused: the payload names another twin than its key"
                    );
                    return Ok(());
                }
                // Only the site's gateways hold its control key: a reader, or anyone in
                // plain mode, registers nothing.
                if ctx.trust.proven(id.site(), &mut req).is_none() {
                    NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
                    tracing::warn!(
                        key = query.key,
                        "registration refused: no proof under the site's control key"
                    );
                    return Ok(());
                }
                match mesh.call(|tx| MeshMsg::Register(req, tx), timeout).await {
                    Ok(ractor::rpc::CallResult::Success(Ok(p))) => Some(p),
                    Ok(ractor::rpc::CallResult::Success(Err(e))) => {
                        tracing::warn!(key = query.key, "registration refused: {e}");
                        None
                    }
                    _ => return Err(()),
                }
            };
            if let Some(p) = placement {
                let (key, placement) = one(&p);
                query.reply_with(&key, &placement);
            }
        }
        _ => {
            let filter = if query.payload.is_empty() {
                PlacementQuery::default()
            } else {
                match query.decode::<PlacementQuery>() {
                    Ok(q) => q,
                    Err(e) => {
                        tracing::warn!(key = query.key, "malformed placement query: {e}");
                        return Ok(());
                    }
                }
            };
            let all = match mesh.call(|tx| MeshMsg::Matching(filter, tx), timeout).await {
                Ok(ractor::rpc::CallResult::Success(all)) => all,
                _ => return Err(()),
            };
            let replies: Vec<_> = all.iter().map(one).collect();
            query.reply_all(&replies);
        }
    }
    Ok(())
}

/// Receives replicated snapshots (stored by the supervisor, fenced by epoch) and serves
/// the newest one of a twin on `twinmesh/snapshots/{site}/{asset}`.
async fn replica_keeper(
    mesh: ActorRef<MeshMsg>,
    ctx: Arc<NodeContext>,
    replicas: crate::ports::Subscription,
    queries: crate::ports::Queryable,
) {
    loop {
        tokio::select! {
            biased;
            s = replicas.rx.recv_async() => {
                let Ok(s) = s else { break };
                match s.decode::<TwinSnapshot>() {
                    // Only a mesh node's proven replica is considered (its owner and
                    // epoch are checked by the authority).
                    Ok(mut snap) => if ctx.trust.proven_mesh(&mut snap).is_none() {
                        NodeMetrics::add(&ctx.metrics.messages_malformed, 1);
                        tracing::warn!(key = s.key, "dropped a replica without a mesh node's proof");
                    } else if mesh.cast(MeshMsg::Replica(snap)).is_err() { break },
                    Err(e) => tracing::warn!(key = s.key, "malformed snapshot: {e}"),
                }
            }
            q = queries.rx.recv_async() => {
                let Ok(q) = q else { break };
                let Some(id) = keys::parse_twin_in(&q.key, "snapshots") else { continue };
                if q.key.contains('*') {
                    continue;
                }
                match ctx.store.load_replica(&id) {
                    Ok(Some(snap)) => {
                        q.reply_with(&keys::snapshot(&id), &snap);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(twin = %id, "replica not readable: {e}"),
                }
            }
        }
    }
}

/// Deadline of each step of a migration.
const MIGRATION_STEP: Duration = Duration::from_secs(5);
/// How long a migration keeps its twin frozen: the twin unfreezes itself after this
/// long, and the authority refuses a commit that comes later.
pub const MIGRATION_FREEZE: Duration = Duration::from_secs(10);

/// Whether the twin's raw data may leave its site: every signal of its kind is public
/// and its current policy (as its replicas report it) protects none.
fn cloud_eligible(p: &Placement) -> bool {
    !p.site_only && kind_public(p)
}

/// Every signal of the twin's kind is public by default.
fn kind_public(p: &Placement) -> bool {
    p.kind.parse::<AssetKind>().is_ok_and(|k| {
        k.schema()
            .signals
            .iter()
            .all(|s| s.sensitivity == twinmesh_twins::kind::Sensitivity::Public)
    })
}

async fn twin_rpc(
    ctx: &NodeContext,
    twin: &TwinId,
    request: twin_request::Request,
    timeout: Duration,
) -> Result<twin_reply::Reply, crate::Error> {
    // The placement authority acts itself (freeze, release a freeze).
    let mut request = TwinRequest {
        caller: Some(ctx.own_caller()),
        request: Some(request),
    };
    ctx.trust.vouch(&mut request, ctx.now_ms());
    let replies = ctx
        .fabric
        .ask(&keys::twin_rpc(twin), &request, timeout)
        .await
        .map_err(|e| crate::Error::unavailable(e.to_string()))?;
    // Only the twin's own node can prove a reply for this request.
    let reply = replies
        .into_iter()
        .find_map(|r| {
            ctx.trust
                .answer::<TwinReply>(request.caller.as_ref(), &r.payload)
        })
        .ok_or_else(|| crate::Error::unavailable(format!("twin {twin} did not answer")))?;
    match reply.reply {
        Some(twin_reply::Reply::Error(e)) => Err(crate::Error::unavailable(format!(
            "twin {twin}: {}",
            e.message
        ))),
        Some(r) => Ok(r),
        None => Err(crate::Error::unavailable(format!(
            "empty reply from twin {twin}"
        ))),
    }
}

async fn call<T: Send + 'static>(
    mesh: &ActorRef<MeshMsg>,
    msg: impl FnOnce(RpcReplyPort<T>) -> MeshMsg,
) -> Result<T, crate::Error> {
    match mesh.call(msg, Some(MIGRATION_STEP)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        _ => Err(crate::Error::unavailable(
            "placement authority is stopping".to_owned(),
        )),
    }
}

/// Live migration (DESIGN §7): freeze → snapshot → new placement (epoch + 1) → the
/// target resumes from the snapshot and the gateway's spool → the source stops. The
/// freeze lasts at most [`MIGRATION_FREEZE`]: a commit that would come later is refused
/// and the twin unfreezes itself. `pin`: an operator's move, which rebalancing keeps.
pub async fn migrate(
    mesh: &ActorRef<MeshMsg>,
    ctx: &NodeContext,
    twin: TwinId,
    target_node: String,
    target_tier: String,
    pin: bool,
) -> Result<MigrateTwinResponse, crate::Error> {
    let started = std::time::Instant::now();
    let span = tracing::debug_span!("mesh.migrate", twin = %twin, pin);
    let moved = tracing::Instrument::instrument(
        migrate_steps(mesh, ctx, twin, target_node, target_tier, pin),
        span,
    )
    .await;
    if moved.is_ok() {
        ctx.metrics
            .latency
            .migration
            .observe(started.elapsed().as_secs_f64());
    }
    moved
}

async fn migrate_steps(
    mesh: &ActorRef<MeshMsg>,
    ctx: &NodeContext,
    twin: TwinId,
    target_node: String,
    target_tier: String,
    pin: bool,
) -> Result<MigrateTwinResponse, crate::Error> {
    let (placement, target) = call(mesh, |reply| MeshMsg::PlanMove {
        twin: twin.clone(),
        target_node,
        target_tier,
        reply,
    })
    .await??;
    let start = tokio::time::Instant::now();
    // Before the freeze goes out, so the twin's own expiry comes no earlier.
    let deadline = start + MIGRATION_FREEZE;
    let snapshot = match twin_rpc(
        ctx,
        &twin,
        twin_request::Request::Freeze(FreezeRequest {
            twin_id: twin.to_string(),
            epoch: placement.epoch,
            release: false,
            timeout_ms: MIGRATION_FREEZE.as_millis() as u64,
        }),
        MIGRATION_STEP,
    )
    .await?
    {
        twin_reply::Reply::Snapshot(s) => s,
        _ => {
            return Err(crate::Error::refused(
                ErrorCode::Internal,
                "unexpected reply to freeze".to_owned(),
            ))
        }
    };
    let frozen_at = start.elapsed();
    call(mesh, |reply| MeshMsg::KeepReplica(snapshot, reply)).await?;
    // Listen before the move, so the new owner's first publication is not missed.
    let states = ctx
        .fabric
        .subscribe(&keys::twin_state(&twin), 64)
        .await
        .map_err(|e| crate::Error::unavailable(e.to_string()))?;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let committed = match mesh
        .call(
            |reply| MeshMsg::CommitMove {
                twin: twin.clone(),
                node: target,
                epoch: placement.epoch,
                deadline,
                pin,
                reply,
            },
            Some(left),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(r)) => r,
        // No answer before the freeze expires: the authority refuses the commit when it
        // comes to it, and the twin unfreezes by itself.
        _ => {
            return Err(crate::Error::unavailable(format!(
                "the move of {twin} was not committed within {MIGRATION_FREEZE:?}"
            )))
        }
    };
    let placed = match committed {
        Ok(p) => p,
        Err(e) => {
            // Nothing moved: let the source go on.
            let _ = twin_rpc(
                ctx,
                &twin,
                twin_request::Request::Freeze(FreezeRequest {
                    twin_id: twin.to_string(),
                    epoch: placement.epoch,
                    release: true,
                    timeout_ms: 0,
                }),
                MIGRATION_STEP,
            )
            .await;
            return Err(e);
        }
    };
    let committed_at = start.elapsed();
    // Done when the twin publishes its state from its new node, at the new epoch (it
    // serves requests by then: its queryable is declared before it starts).
    let up_by = start + MIGRATION_STEP * 2;
    loop {
        let left = up_by.saturating_duration_since(tokio::time::Instant::now());
        let sample = match tokio::time::timeout(left, states.rx.recv_async()).await {
            Ok(Ok(s)) => s,
            _ => {
                return Err(crate::Error::unavailable(format!(
                    "twin {twin} did not come up on {} in time",
                    placed.node
                )))
            }
        };
        let up = sample
            .decode::<proto::TwinState>()
            .ok()
            .and_then(|s| s.twin)
            .and_then(|t| t.placement)
            .is_some_and(|p| p.epoch == placed.epoch && p.node == placed.node);
        if up {
            break;
        }
    }
    let duration_ns = start.elapsed().as_nanos() as i64;
    tracing::debug!(twin = %twin, ?frozen_at, ?committed_at, total = ?start.elapsed(), "migration steps");
    tracing::info!(twin = %twin, from = placement.node, to = placed.node, epoch = placed.epoch, ms = duration_ns as f64 / 1e6, "migrated");
    Ok(MigrateTwinResponse {
        placement: Some(placed),
        duration_ns,
    })
}

/// `MigrateTwin` with `unpin`: the twin stays where it is, and rebalancing may move it
/// again.
async fn unpin(
    mesh: &ActorRef<MeshMsg>,
    twin: TwinId,
    target_node: &str,
    target_tier: &str,
) -> Result<MigrateTwinResponse, crate::Error> {
    if !(target_node.is_empty() && target_tier.is_empty()) {
        return Err(crate::Error::refused(
            ErrorCode::InvalidArgument,
            "unpin moves nothing: leave target_node and target_tier empty".to_owned(),
        ));
    }
    let placed = call(mesh, |reply| MeshMsg::Unpin(twin, reply)).await??;
    Ok(MigrateTwinResponse {
        placement: Some(placed),
        duration_ns: 0,
    })
}

async fn drain(
    mesh: &ActorRef<MeshMsg>,
    ctx: &NodeContext,
    node: String,
) -> Result<DrainNodeResponse, crate::Error> {
    let twins = call(mesh, |reply| MeshMsg::StartDrain(node, reply)).await??;
    let mut out = DrainNodeResponse::default();
    for p in twins {
        let Ok(id) = p.twin_id.parse::<TwinId>() else {
            continue;
        };
        match migrate(mesh, ctx, id, String::new(), String::new(), false).await {
            Ok(r) => out.moved.extend(r.placement),
            Err(e) => out.stuck.push(Placement {
                reason: e.to_string(),
                ..p
            }),
        }
    }
    Ok(out)
}

/// Sends `request` to the placement authority (the cloud node) over the fabric, from any
/// node; the authority's errors come back as they are, silence as `UNAVAILABLE`.
pub async fn ask_authority(
    fabric: &dyn crate::ports::Fabric,
    trust: &crate::trust::Trust,
    caller: proto::Caller,
    request: mesh_request::Request,
    timeout: Duration,
    now_ms: i64,
) -> Result<mesh_reply::Reply, proto::Error> {
    let unavailable = |message: String| proto::Error {
        code: proto::ErrorCode::Unavailable as i32,
        message,
    };
    let mut request = MeshRequest {
        request: Some(request),
        caller: Some(caller),
    };
    trust.vouch_mesh(&mut request, now_ms);
    let replies = fabric
        .ask(keys::MESH_REQUESTS, &request, timeout)
        .await
        .map_err(|e| unavailable(format!("fabric: {e}")))?;
    // Only the placement authority (a mesh node) can prove a reply for this request.
    let reply = replies
        .into_iter()
        .find_map(|r| trust.answer::<MeshReply>(request.caller.as_ref(), &r.payload))
        .ok_or_else(|| {
            unavailable("the placement authority (cloud node) did not answer".to_owned())
        })?;
    match reply.reply {
        Some(mesh_reply::Reply::Error(e)) => Err(e),
        Some(r) => Ok(r),
        None => Err(proto::Error {
            code: proto::ErrorCode::Internal as i32,
            message: "empty reply from the placement authority".to_owned(),
        }),
    }
}

async fn mesh_request_server(
    mesh: ActorRef<MeshMsg>,
    ctx: Arc<NodeContext>,
    requests: crate::ports::Queryable,
) {
    loop {
        let Ok(mut query) = requests.rx.recv_async().await else {
            break;
        };
        let (mesh, ctx2) = (mesh.clone(), ctx.clone());
        ctx.tasks.spawn(async move {
            let result = match query.decode::<MeshRequest>() {
                Ok(mut req) => {
                    let admitted = ctx2.trust.admit_mesh(&mut req, ctx2.now_ms());
                    let (caller, tag) = admitted.unzip();
                    // Every reply to a vouched request is proven for it.
                    query = crate::trust::proving::<MeshReply>(&ctx2.trust, query, tag);
                    let drain_site = match &req.request {
                        Some(mesh_request::Request::Drain(d)) => call(&mesh, MeshMsg::Members)
                            .await
                            .ok()
                            .and_then(|m| m.into_iter().find(|n| n.node == d.node))
                            .map(|n| n.site),
                        _ => None,
                    };
                    match authorize_mesh(
                        caller.as_ref(),
                        req.request.as_ref(),
                        drain_site.as_deref(),
                    ) {
                        Ok(()) => serve_mesh_request(&mesh, &ctx2, req.request).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(crate::Error::refused(
                    ErrorCode::InvalidArgument,
                    format!("malformed mesh request: {e}"),
                )),
            };
            let reply = MeshReply {
                reply: Some(match result {
                    Ok(r) => r,
                    Err(e) => mesh_reply::Reply::Error((&e).into()),
                }),
                proof: None,
            };
            query.reply_with(keys::MESH_REQUESTS, &reply);
        });
    }
}

/// The member `info` describes, if it may be one: it names the node of its liveliness
/// token, and an edge or cloud node proves it with the mesh key (anything else is at
/// most a gateway, which hosts no twins).
fn member(ctx: &NodeContext, token_node: &str, mut info: NodeInfo) -> Option<NodeInfo> {
    if info.node != token_node {
        return None;
    }
    let hosts = info.tier == Tier::Edge.as_str() || info.tier == Tier::Cloud.as_str();
    let proven = ctx.trust.proven_mesh(&mut info);
    (!hosts || proven.as_deref() == Some(token_node)).then_some(info)
}

/// Whether `caller` (as a mesh node vouched for it, `None` otherwise) may make `request`:
/// the request's least role, on the site it acts on when the role is site-scoped.
fn authorize_mesh(
    caller: Option<&proto::Caller>,
    request: Option<&mesh_request::Request>,
    drain_site: Option<&str>,
) -> Result<(), crate::Error> {
    let Some(request) = request else {
        return Err(crate::Error::refused(
            ErrorCode::InvalidArgument,
            "empty mesh request".to_owned(),
        ));
    };
    let Some(caller) = caller else {
        return Err(crate::Error::refused(
            ErrorCode::PermissionDenied,
            "mesh requests need a caller vouched for by a mesh node (edge or cloud) with \
             the mesh key"
                .to_owned(),
        ));
    };
    let least = crate::trust::least_mesh_role(request);
    let role = twinmesh_twins::privacy::role_of(Some(caller));
    if role < least {
        return Err(crate::Error::refused(
            ErrorCode::PermissionDenied,
            format!(
                "role {} may not make this mesh request (needs {})",
                role.as_str(),
                least.as_str()
            ),
        ));
    }
    let site = match request {
        mesh_request::Request::Migrate(m) => m.twin_id.split('/').next().map(str::to_owned),
        mesh_request::Request::SiteBudget(b) => Some(b.site.clone()),
        // A drain moves the twins of the node's site (from its membership entry).
        mesh_request::Request::Drain(_) => drain_site.map(str::to_owned),
    };
    let scoped_out = !caller.sites.is_empty()
        && match &site {
            Some(site) => !caller.sites.contains(site),
            None => true,
        };
    if scoped_out {
        return Err(crate::Error::refused(
            ErrorCode::PermissionDenied,
            format!(
                "role {} holds on {} only",
                role.as_str(),
                caller.sites.join(", ")
            ),
        ));
    }
    Ok(())
}

async fn serve_mesh_request(
    mesh: &ActorRef<MeshMsg>,
    ctx: &Arc<NodeContext>,
    request: Option<mesh_request::Request>,
) -> Result<mesh_reply::Reply, crate::Error> {
    match request {
        Some(mesh_request::Request::Migrate(m)) => match m.twin_id.parse::<TwinId>() {
            Ok(id) if m.unpin => unpin(mesh, id, &m.target_node, &m.target_tier)
                .await
                .map(mesh_reply::Reply::Migrate),
            // An operator's move pins the twin.
            Ok(id) => migrate(mesh, ctx, id, m.target_node, m.target_tier, true)
                .await
                .map(mesh_reply::Reply::Migrate),
            Err(e) => Err(crate::Error::refused(
                ErrorCode::InvalidArgument,
                e.to_string(),
            )),
        },
        Some(mesh_request::Request::Drain(d)) => {
            drain(mesh, ctx, d.node).await.map(mesh_reply::Reply::Drain)
        }
        Some(mesh_request::Request::SiteBudget(b)) => call(mesh, |tx| MeshMsg::SiteBudget(b, tx))
            .await
            .and_then(|r| r)
            .map(mesh_reply::Reply::SiteBudget),
        None => Err(crate::Error::refused(
            ErrorCode::InvalidArgument,
            "empty mesh request".to_owned(),
        )),
    }
}

/// After a join, moves one twin every `REBALANCE_PERIOD` while an edge of a site holds
/// more than one twin more than another.
async fn rebalancer(mesh: ActorRef<MeshMsg>, ctx: Arc<NodeContext>) {
    loop {
        tokio::time::sleep(REBALANCE_PERIOD).await;
        let Ok(Some(twin)) = call(&mesh, MeshMsg::SuggestMove).await else {
            continue;
        };
        match migrate(
            &mesh,
            &ctx,
            twin.clone(),
            String::new(),
            Tier::Edge.to_string(),
            false,
        )
        .await
        {
            Ok(r) => {
                tracing::info!(twin = %twin, to = r.placement.map(|p| p.node).unwrap_or_default(), "rebalanced")
            }
            Err(e) => tracing::warn!(twin = %twin, "rebalancing move failed: {e}"),
        }
    }
}
