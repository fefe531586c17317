//! A whole mesh in one process on virtual time: nodes with the real actors on the
//! in-memory fabric and store, which a test kills, restarts and partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use twinmesh_actors::context::{NodeContext, TwinConfig};
use twinmesh_actors::gateway::{GatewayActor, GatewayArgs, GatewayConfig, GatewayMsg};
use twinmesh_actors::mesh::{MeshMsg, MeshSupervisor};
use twinmesh_actors::metrics::NodeMetrics;
use twinmesh_actors::node::{NodeMsg, NodeSupervisor};
use twinmesh_actors::ports::{Clock, Device, Guard};
use twinmesh_twins::proto::NodeInfo;
use twinmesh_twins::{keys, AssetKind, NodeId, Tier, TwinId};

use super::fabric::Network;
use super::store::MemStore;
use crate::SimDevice;

/// Virtual wall clock: a fixed epoch plus tokio's (paused) clock.
pub struct SimClock {
    base_ns: i64,
    t0: tokio::time::Instant,
}

impl SimClock {
    pub fn new(base_ns: i64) -> Self {
        SimClock {
            base_ns,
            t0: tokio::time::Instant::now(),
        }
    }
}

impl Clock for SimClock {
    fn now_ns(&self) -> i64 {
        self.base_ns + self.t0.elapsed().as_nanos() as i64
    }
}

/// How a node is built.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: String,
    pub tier: Tier,
    pub site: String,
    /// Simulated assets (iot tier).
    pub devices: Vec<(TwinId, AssetKind)>,
}

struct Running {
    ctx: Arc<NodeContext>,
    actors: Vec<ractor::ActorCell>,
    _token: Guard,
}

/// One simulated node: its spec and its store, which outlives crashes.
pub struct SimNode {
    pub spec: NodeSpec,
    pub store: Arc<MemStore>,
    running: Option<Running>,
    pub mesh: Option<ActorRef<MeshMsg>>,
    pub supervisor: Option<ActorRef<NodeMsg>>,
    pub gateway: Option<ActorRef<GatewayMsg>>,
}

pub struct SimCluster {
    pub net: Arc<Network>,
    pub nodes: BTreeMap<String, SimNode>,
    clock: Arc<SimClock>,
    seed: u64,
    /// Twin settings of the nodes started from now on (analysis off: it runs on a
    /// thread pool, outside virtual time).
    pub twin_config: TwinConfig,
    /// Gateway settings of the iot nodes started from now on.
    pub gateway_config: GatewayConfig,
}

impl SimCluster {
    pub fn new(net: Arc<Network>, seed: u64) -> Self {
        SimCluster {
            net,
            nodes: BTreeMap::new(),
            // 2026-01-01T12:00:00Z
            clock: Arc::new(SimClock::new(1_767_268_800_000_000_000)),
            seed,
            twin_config: TwinConfig {
                analysis: false,
                ..TwinConfig::default()
            },
            gateway_config: GatewayConfig::default(),
        }
    }

    pub fn clock(&self) -> Arc<SimClock> {
        self.clock.clone()
    }

    pub async fn add(&mut self, spec: NodeSpec) -> twinmesh_actors::Result<()> {
        let id = spec.id.clone();
        self.nodes.insert(
            id.clone(),
            SimNode {
                spec,
                store: Arc::new(MemStore::default()),
                running: None,
                mesh: None,
                supervisor: None,
                gateway: None,
            },
        );
        self.start(&id).await
    }

    pub fn is_up(&self, id: &str) -> bool {
        self.nodes.get(id).is_some_and(|n| n.running.is_some())
    }

    /// Starts (or restarts) a node on its store.
    pub async fn start(&mut self, id: &str) -> twinmesh_actors::Result<()> {
        self.net.revive(id);
        let fabric = Arc::new(self.net.fabric(id));
        let node = self.nodes.get_mut(id).expect("known node");
        let spec = node.spec.clone();
        let node_id: NodeId = spec.id.parse()?;
        let ctx = Arc::new(NodeContext {
            node: node_id.clone(),
            tier: spec.tier,
            site: spec.site.clone(),
            fabric: fabric.clone(),
            store: node.store.clone(),
            clock: self.clock.clone(),
            metrics: Arc::new(NodeMetrics::default()),
            directory: Default::default(),
            twin_config: self.twin_config.clone(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            analysis_permits: Arc::new(tokio::sync::Semaphore::new(1)),
            router: Default::default(),
            site_key: None,
        });
        let info = NodeInfo {
            node: spec.id.clone(),
            tier: spec.tier.to_string(),
            site: spec.site.clone(),
            capacity: 1000,
            ..Default::default()
        };
        twinmesh_actors::services::serve_node_queryables(&ctx, info).await?;
        let mut actors = Vec::new();
        if spec.tier == Tier::Cloud {
            let (a, _) = Actor::spawn(None, MeshSupervisor, ctx.clone())
                .await
                .map_err(twinmesh_actors::Error::actor)?;
            actors.push(a.get_cell());
            node.mesh = Some(a);
        }
        if spec.tier != Tier::Iot {
            let (a, _) = Actor::spawn(None, NodeSupervisor, ctx.clone())
                .await
                .map_err(twinmesh_actors::Error::actor)?;
            actors.push(a.get_cell());
            node.supervisor = Some(a);
        }
        if spec.tier == Tier::Iot {
            let devices: Vec<Box<dyn Device>> = spec
                .devices
                .iter()
                .map(|(id, kind)| {
                    Box::new(SimDevice::new(id.clone(), *kind, self.seed)) as Box<dyn Device>
                })
                .collect();
            let args = GatewayArgs {
                ctx: ctx.clone(),
                devices,
                config: self.gateway_config.clone(),
                chains: BTreeMap::new(),
            };
            let (a, _) = Actor::spawn(None, GatewayActor, args)
                .await
                .map_err(twinmesh_actors::Error::actor)?;
            actors.push(a.get_cell());
            node.gateway = Some(a);
        }
        let token = fabric_token(&ctx, &node_id).await?;
        node.running = Some(Running {
            ctx,
            actors,
            _token: token,
        });
        Ok(())
    }

    /// `kill -9`: links close, actors and tasks die, unflushed writes are lost.
    pub async fn kill(&mut self, id: &str) {
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        let Some(running) = node.running.take() else {
            return;
        };
        self.net.kill(id);
        running.ctx.cancel.cancel();
        for a in &running.actors {
            a.kill();
        }
        for a in &running.actors {
            let _ = tokio::time::timeout(Duration::from_secs(5), a.wait(None)).await;
        }
        running.ctx.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), running.ctx.tasks.wait()).await;
        node.mesh = None;
        node.supervisor = None;
        node.gateway = None;
        node.store.crash();
    }

    /// A clean stop of every node (gateway first), then of the network.
    pub async fn shutdown(&mut self) {
        let ids: Vec<String> = self.nodes.keys().cloned().collect();
        for id in ids.iter().rev() {
            let Some(node) = self.nodes.get_mut(id) else {
                continue;
            };
            let Some(running) = node.running.take() else {
                continue;
            };
            for a in running.actors.iter().rev() {
                let _ = a.stop_and_wait(None, Some(Duration::from_secs(5))).await;
            }
            running.ctx.cancel.cancel();
            running.ctx.tasks.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), running.ctx.tasks.wait()).await;
        }
        self.net.shutdown().await;
    }
}

async fn fabric_token(ctx: &NodeContext, node: &NodeId) -> twinmesh_actors::Result<Guard> {
    ctx.fabric.liveliness_token(&keys::node_token(node)).await
}
