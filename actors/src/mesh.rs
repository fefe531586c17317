//! `MeshSupervisor`: the placement authority, on the cloud node. It tracks membership from
//! Zenoh liveliness, keeps the placement table (with epochs) in the store, registers
//! assets announced by gateways, places each twin, and answers `twinmesh/placement/**`.
//!
//! Placement policy today: a twin lives on a live edge node of its own site (the least
//! loaded one); with none alive, its placement is `stale` until one joins.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use twinmesh_proto::encoding;
use twinmesh_twins::proto::{NodeInfo, Placement, PlacementQuery, PlacementRequest};
use twinmesh_twins::{keys, AssetKind, Error as DomainError, Tier, TwinId};

use crate::context::NodeContext;
use crate::ports::{Qos, Query, SampleKind};

pub const STATUS_ACTIVE: &str = "active";
pub const STATUS_STALE: &str = "stale";

pub enum MeshMsg {
    NodeUp(NodeInfo),
    NodeDown(String),
    Register(
        PlacementRequest,
        RpcReplyPort<Result<Placement, DomainError>>,
    ),
    Get(TwinId, RpcReplyPort<Option<Placement>>),
    ForNode(String, RpcReplyPort<Vec<Placement>>),
    Members(RpcReplyPort<Vec<NodeInfo>>),
}

pub struct MeshSupervisor;

pub struct MeshState {
    ctx: Arc<NodeContext>,
    members: BTreeMap<String, NodeInfo>,
    placements: BTreeMap<TwinId, Placement>,
    cancel: CancellationToken,
}

impl MeshState {
    /// The feasible node for a twin of `site` with the fewest twins placed on it.
    fn choose_node(&self, site: &str) -> Option<&NodeInfo> {
        self.members
            .values()
            .filter(|n| n.tier == Tier::Edge.as_str() && n.site == site)
            .min_by_key(|n| {
                let placed = self
                    .placements
                    .values()
                    .filter(|p| p.node == n.node)
                    .count();
                (placed, n.node.clone())
            })
    }

    async fn commit(&mut self, placement: Placement) -> crate::Result<()> {
        self.ctx.store.save_placement(&placement)?;
        self.ctx.store.flush().await?;
        let id: TwinId = placement.twin_id.parse()?;
        self.ctx
            .fabric
            .publish(
                &keys::placement(&id),
                Bytes::from(placement.encode_to_vec()),
                encoding::PLACEMENT,
                Qos::Reliable,
            )
            .await?;
        tracing::info!(twin = %id, node = placement.node, epoch = placement.epoch, status = placement.status, "placement");
        self.placements.insert(id, placement);
        Ok(())
    }

    fn place(&self, mut placement: Placement) -> Placement {
        match self.choose_node(&placement.site) {
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
                placement.status = STATUS_STALE.to_owned();
                placement.reason = format!("no live edge node of site {}", placement.site);
            }
        }
        placement
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
        let cancel = ctx.cancel.child_token();
        let members = ctx.fabric.liveliness_subscribe(keys::NODE_TOKENS).await?;
        let queryable = ctx.fabric.queryable(keys::PLACEMENT_ALL, 1024).await?;
        ctx.tasks.spawn(membership_watcher(
            myself.clone(),
            ctx.clone(),
            members,
            cancel.clone(),
        ));
        ctx.tasks
            .spawn(placement_server(myself.clone(), queryable, cancel.clone()));
        tracing::info!(placements = placements.len(), "placement authority started");
        Ok(MeshState {
            ctx,
            members: BTreeMap::new(),
            placements,
            cancel,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.cancel.cancel();
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
                let waiting: Vec<Placement> = state
                    .placements
                    .values()
                    .filter(|p| p.status == STATUS_STALE && p.site == site)
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
            }
            MeshMsg::Register(req, reply) => {
                let result = async {
                    let id: TwinId = req.twin_id.parse()?;
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
            MeshMsg::ForNode(node, reply) => {
                let _ = reply.send(
                    state
                        .placements
                        .values()
                        .filter(|p| node.is_empty() || p.node == node)
                        .cloned()
                        .collect(),
                );
            }
            MeshMsg::Members(reply) => {
                let _ = reply.send(state.members.values().cloned().collect());
            }
        }
        Ok(())
    }
}

async fn membership_watcher(
    mesh: ActorRef<MeshMsg>,
    ctx: Arc<NodeContext>,
    members: crate::ports::Subscription,
    cancel: CancellationToken,
) {
    loop {
        let sample = tokio::select! {
            _ = cancel.cancelled() => break,
            s = members.rx.recv_async() => match s { Ok(s) => s, Err(_) => break },
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
                        .and_then(|r| NodeInfo::decode(r.payload).ok())
                    {
                        let _ = mesh.cast(MeshMsg::NodeUp(info));
                        break;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))) => {}
                    }
                }
            }
        }
    }
}

async fn placement_server(
    mesh: ActorRef<MeshMsg>,
    queryable: crate::ports::Queryable,
    cancel: CancellationToken,
) {
    loop {
        let query = tokio::select! {
            _ = cancel.cancelled() => break,
            q = queryable.rx.recv_async() => match q { Ok(q) => q, Err(_) => break },
        };
        if serve_placement_query(&mesh, query).await.is_err() {
            break;
        }
    }
}

async fn serve_placement_query(mesh: &ActorRef<MeshMsg>, query: Query) -> Result<(), ()> {
    let timeout = Some(Duration::from_secs(5));
    let one = |p: &Placement| {
        (
            keys::placement(&p.twin_id.parse().expect("stored ids are valid")),
            Bytes::from(p.encode_to_vec()),
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
                let Ok(req) = PlacementRequest::decode(query.payload.clone()) else {
                    tracing::warn!(key = query.key, "malformed placement request");
                    return Ok(());
                };
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
                let (key, payload) = one(&p);
                query.reply(&key, payload, encoding::PLACEMENT).await;
            }
        }
        _ => {
            let node = if query.payload.is_empty() {
                String::new()
            } else {
                PlacementQuery::decode(query.payload.clone())
                    .map(|q| q.node)
                    .unwrap_or_default()
            };
            let all = match mesh.call(|tx| MeshMsg::ForNode(node, tx), timeout).await {
                Ok(ractor::rpc::CallResult::Success(all)) => all,
                _ => return Err(()),
            };
            let replies = all.iter().map(one).collect();
            query
                .responder
                .reply_many(replies, encoding::PLACEMENT)
                .await;
        }
    }
    Ok(())
}
