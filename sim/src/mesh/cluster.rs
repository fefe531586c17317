//! A whole mesh in one process on virtual time: nodes assembled as in production
//! ([`Assembly`]: the real actors, queryables, load, the cloud's archive and model
//! registry) on the in-memory fabric and store, which a test kills, restarts and
//! partitions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;

use twinmesh_actors::assembly::{Assembly, NodeParts};
use twinmesh_actors::context::{NodeContext, TwinConfig};
use twinmesh_actors::gateway::{GatewayConfig, GatewayMsg};
use twinmesh_actors::mesh::MeshMsg;
use twinmesh_actors::node::NodeMsg;
use twinmesh_actors::ports::{Clock, Device};
use twinmesh_actors::registry::Registry;
use twinmesh_twins::proto::NodeInfo;
use twinmesh_twins::{AssetKind, NodeId, Tier, TwinId};

use super::fabric::Network;
use super::store::MemStore;
use crate::SimDevice;

/// How long a clean stop of one node may take.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

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
    /// Assets of the gateway (iot tier): simulated, or, for a kind without a simulator,
    /// a [`crate::QuietDevice`].
    pub devices: Vec<(TwinId, AssetKind)>,
}

/// Sites every simulated cloud holds the control keys of.
pub const SIM_SITES: [&str; 6] = ["a", "b", "c", "s", "site-a", "site-b"];

/// The keys `twinmesh up` would give the node (fixed, from the node's tier and site): the
/// mesh key to edges and the cloud, the site key to the site's edge and gateway, the
/// control key of its site to each (every site's to the cloud).
pub fn sim_trust(spec: &NodeSpec, sites: &[String]) -> twinmesh_actors::trust::Trust {
    use twinmesh_actors::seal::KeyRing;
    let ring = |label: &str| {
        let mut key = [0u8; 32];
        for (i, b) in label.bytes().enumerate() {
            key[i % 32] ^= b.wrapping_add(i as u8);
        }
        KeyRing::new(vec![("k1".to_owned(), key)]).expect("one valid key")
    };
    let mut trust = twinmesh_actors::trust::Trust::new(&spec.id, &spec.site);
    if spec.tier != Tier::Iot {
        trust = trust.with_mesh_key(&ring("sim mesh key"));
    }
    if spec.tier != Tier::Cloud {
        trust = trust.with_site_key(&ring(&format!("sim site key {}", spec.site)));
    }
    for site in sites {
        if spec.tier == Tier::Cloud || *site == spec.site {
            trust = trust.with_control_key(site, &ring(&format!("sim control key {site}")));
        }
    }
    trust
}

/// One simulated node: its spec and its store, which outlives crashes.
pub struct SimNode {
    pub spec: NodeSpec,
    pub store: Arc<MemStore>,
    running: Option<Assembly>,
}

impl SimNode {
    /// The running node's context.
    pub fn ctx(&self) -> Option<&Arc<NodeContext>> {
        self.running.as_ref().map(|a| &a.ctx)
    }

    /// Cloud nodes: the placement authority, while it runs.
    pub fn mesh(&self) -> Option<ActorRef<MeshMsg>> {
        self.running.as_ref()?.mesh.as_ref()?.get()
    }

    /// Edge and cloud nodes: the node supervisor, while it runs.
    pub fn supervisor(&self) -> Option<ActorRef<NodeMsg>> {
        self.running.as_ref()?.supervisor.as_ref()?.get()
    }

    /// IoT nodes: the gateway, while it runs.
    pub fn gateway(&self) -> Option<ActorRef<GatewayMsg>> {
        self.running.as_ref()?.gateway.as_ref()?.get()
    }

    /// The running node's assembly (its kept actors and their health).
    pub fn assembly(&self) -> Option<&Assembly> {
        self.running.as_ref()
    }

    /// Cloud nodes: the model registry.
    pub fn registry(&self) -> Option<&Arc<Registry>> {
        self.running.as_ref().and_then(|a| a.registry.as_ref())
    }
}

pub struct SimCluster {
    pub net: Arc<Network>,
    pub nodes: BTreeMap<String, SimNode>,
    pub clock: Arc<SimClock>,
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
            },
        );
        self.start(&id).await
    }

    pub fn is_up(&self, id: &str) -> bool {
        self.nodes.get(id).is_some_and(|n| n.running.is_some())
    }

    /// Starts (or restarts) a node on its store, assembled as in production.
    pub async fn start(&mut self, id: &str) -> twinmesh_actors::Result<()> {
        self.net.revive(id);
        // The sites of the simulations (a cloud started before its sites' nodes still
        // holds their control keys, as `up` gives them).
        let sites: Vec<String> = SIM_SITES
            .iter()
            .map(|s| s.to_string())
            .chain(self.nodes.values().map(|n| n.spec.site.clone()))
            .collect();
        let fabric = Arc::new(self.net.fabric(id));
        let node = self.nodes.get_mut(id).expect("known node");
        let spec = node.spec.clone();
        let node_id: NodeId = spec.id.parse()?;
        let devices: Vec<Box<dyn Device>> = spec
            .devices
            .iter()
            .map(|(id, kind)| {
                if crate::model::has_simulator(*kind) {
                    Box::new(SimDevice::new(id.clone(), *kind, self.seed)) as Box<dyn Device>
                } else {
                    Box::new(crate::device::QuietDevice::new(id.clone(), *kind))
                }
            })
            .collect();
        let trust = Arc::new(sim_trust(&spec, &sites));
        let assembly = Assembly::start(NodeParts {
            trust,
            node: node_id,
            tier: spec.tier,
            site: spec.site.clone(),
            fabric,
            store: node.store.clone(),
            clock: self.clock.clone(),
            twin_config: self.twin_config.clone(),
            analysis_permits: 1,
            site_key: None,
            info: NodeInfo {
                capacity: 1000,
                ..Default::default()
            },
            devices,
            gateway: self.gateway_config.clone(),
            chains: BTreeMap::new(),
        })
        .await?;
        node.running = Some(assembly);
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
        running.kill().await;
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
            running.stop(SHUTDOWN_BOUND).await;
        }
        self.net.shutdown().await;
    }
}
