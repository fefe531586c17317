//! One node, assembled: the [`NodeContext`] on the node's ports, the actors its tier
//! runs, the node's queryables and load, the cloud's feature archive and model registry,
//! and the liveliness token — started in that order and stopped in the reverse one. The
//! three long-lived actors run under a [`Keeper`](crate::keeper::Keeper) each: restarted
//! on failure, and the node's [`Health`] says when one is down.
//! `nodes` (over Zenoh and sled) and `sim`'s cluster (in memory, on virtual time) both
//! build their nodes here, so the simulation runs the production assembly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::wire::TypedFabric;
use twinmesh_twins::chain::Chain;
use twinmesh_twins::proto::{FeatureSet, NodeInfo, NodeLoad};
use twinmesh_twins::{keys, AssetKind, NodeId, Tier, TwinId};

use crate::context::{NodeContext, TwinConfig};
use crate::error::Result;
use crate::gateway::{GatewayActor, GatewayArgs, GatewayConfig, GatewayMsg};
use crate::keeper::{keep, Health, KeeperArgs, Kept, RestartPolicy};
use crate::mesh::{MeshMsg, MeshSupervisor};
use crate::metrics::NodeMetrics;
use crate::node::{NodeMsg, NodeSupervisor};
use crate::ports::{
    Device, Guard, Qos, SharedClock, SharedFabric, SharedStore, StoredFrame, Subscription,
};
use crate::registry::{serve_registry, Registry};
use crate::seal::KeyRing;

/// How long one actor may take to stop before the next is asked.
const ACTOR_STOP_BOUND: Duration = Duration::from_secs(5);
/// How often a node publishes its `NodeLoad`.
const LOAD_PERIOD: Duration = Duration::from_secs(1);

/// What a node is made of: its ports, identity and configuration.
pub struct NodeParts {
    pub node: NodeId,
    pub tier: Tier,
    pub site: String,
    pub fabric: SharedFabric,
    pub store: SharedStore,
    pub clock: SharedClock,
    pub twin_config: TwinConfig,
    /// Analysis windows computed at once on the blocking pool.
    pub analysis_permits: usize,
    pub site_key: Option<Arc<KeyRing>>,
    /// What the node can prove and check on the fabric.
    pub trust: Arc<crate::trust::Trust>,
    /// What the node's info queryable answers (the twin count and start time are
    /// filled in here).
    pub info: NodeInfo,
    /// IoT tier: the devices the gateway polls, with its settings and the chains
    /// configured per kind (validated; other kinds use their default).
    pub devices: Vec<Box<dyn Device>>,
    pub gateway: GatewayConfig,
    pub chains: BTreeMap<AssetKind, Chain>,
}

/// A started node's actors and services. Drop does not stop it: call
/// [`Assembly::stop`] (a clean stop) or [`Assembly::kill`] (a crash).
pub struct Assembly {
    pub ctx: Arc<NodeContext>,
    /// Cloud tier: the placement authority.
    pub mesh: Option<Kept<MeshMsg>>,
    /// Edge and cloud tiers: hosts the twins placed here.
    pub supervisor: Option<Kept<NodeMsg>>,
    /// IoT tier.
    pub gateway: Option<Kept<GatewayMsg>>,
    /// Which of the actors above is down (restarting or given up on).
    pub health: Health,
    /// Cloud tier: the model registry (its fabric service runs with the node).
    pub registry: Option<Arc<Registry>>,
    token: Option<Guard>,
}

impl Assembly {
    /// Starts the node: queryables, load, (cloud) archive and registry, actors, and the
    /// liveliness token last, so whoever sees it can query the node.
    pub async fn start(parts: NodeParts) -> Result<Assembly> {
        let NodeParts {
            node,
            tier,
            site,
            fabric,
            store,
            clock,
            twin_config,
            analysis_permits,
            site_key,
            trust,
            info,
            devices,
            gateway,
            chains,
        } = parts;
        let ctx = Arc::new(NodeContext {
            node,
            tier,
            site,
            fabric,
            store,
            clock,
            metrics: Arc::new(NodeMetrics::default()),
            directory: Default::default(),
            twin_config,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            analysis_permits: Arc::new(tokio::sync::Semaphore::new(analysis_permits.max(1))),
            router: Default::default(),
            site_key,
            trust,
        });
        let info = NodeInfo {
            node: ctx.node.to_string(),
            tier: tier.to_string(),
            site: ctx.site.clone(),
            twins: 0,
            started_ns: ctx.now_ns(),
            ..info
        };
        let mut assembly = Assembly {
            ctx: ctx.clone(),
            mesh: None,
            supervisor: None,
            gateway: None,
            registry: None,
            health: Health::default(),
            token: None,
        };
        // A failed start leaves nothing running.
        match assembly.start_parts(info, devices, gateway, chains).await {
            Ok(()) => Ok(assembly),
            Err(e) => {
                assembly.kill().await;
                Err(e)
            }
        }
    }

    async fn start_parts(
        &mut self,
        info: NodeInfo,
        devices: Vec<Box<dyn Device>>,
        gateway: GatewayConfig,
        chains: BTreeMap<AssetKind, Chain>,
    ) -> Result<()> {
        let ctx = self.ctx.clone();
        // Kinds this node learned over the fabric before it stopped, before any twin.
        let reloaded = crate::kinds::reload(ctx.store.as_ref())?;
        if !reloaded.is_empty() {
            tracing::info!(
                kinds = reloaded.len(),
                "reloaded asset kinds learned over the fabric"
            );
        }
        crate::services::serve_node_queryables(&ctx, info).await?;
        if ctx.tier != Tier::Iot {
            let q = ctx.fabric.queryable(keys::KINDS_ALL, 64).await?;
            ctx.spawn_until_cancelled(crate::kinds::serve(ctx.clone(), q));
        }
        ctx.spawn_until_cancelled(publish_load(ctx.clone()));
        if ctx.tier == Tier::Cloud {
            let features = ctx.fabric.subscribe(keys::FEATURES_ALL, 4096).await?;
            ctx.spawn_until_cancelled(archive_features(ctx.clone(), features));
            let registry = Arc::new(Registry::new(ctx.store.clone()));
            serve_registry(ctx.clone(), registry.clone()).await?;
            self.registry = Some(registry);
            let c = ctx.clone();
            self.mesh = Some(
                keep(KeeperArgs {
                    role: "placement authority",
                    actor: MeshSupervisor,
                    args: Box::new(move || c.clone()),
                    policy: RestartPolicy::default(),
                    health: self.health.clone(),
                })
                .await?,
            );
        }
        if ctx.tier != Tier::Iot {
            let c = ctx.clone();
            self.supervisor = Some(
                keep(KeeperArgs {
                    role: "node supervisor",
                    actor: NodeSupervisor,
                    args: Box::new(move || c.clone()),
                    policy: RestartPolicy::default(),
                    health: self.health.clone(),
                })
                .await?,
            );
        }
        if ctx.tier == Tier::Iot {
            // The devices outlive a gateway that fails: each start gets handles to them.
            let devices: Vec<SharedDevice> = devices.into_iter().map(SharedDevice::new).collect();
            let c = ctx.clone();
            self.gateway = Some(
                keep(KeeperArgs {
                    role: "gateway",
                    actor: GatewayActor,
                    args: Box::new(move || GatewayArgs {
                        ctx: c.clone(),
                        devices: devices
                            .iter()
                            .map(|d| Box::new(d.clone()) as Box<dyn Device>)
                            .collect(),
                        config: gateway.clone(),
                        chains: chains.clone(),
                    }),
                    policy: RestartPolicy::default(),
                    health: self.health.clone(),
                })
                .await?,
            );
        }
        self.token = Some(
            ctx.fabric
                .liveliness_token(&keys::node_token(&ctx.node))
                .await?,
        );
        Ok(())
    }

    fn actors(&self) -> Vec<ractor::ActorCell> {
        // Stop order: the gateway (no new frames), the twins' supervisor, the mesh.
        // (Their keepers: stopping one stops its actor cleanly; killing it kills both.)
        let mut cells = Vec::new();
        if let Some(a) = &self.gateway {
            cells.push(a.keeper().get_cell());
        }
        if let Some(a) = &self.supervisor {
            cells.push(a.keeper().get_cell());
        }
        if let Some(a) = &self.mesh {
            cells.push(a.keeper().get_cell());
        }
        cells
    }

    /// A clean stop: the gateway, the node supervisor (its twins snapshot), the mesh,
    /// then the token, and every task of the node, within `bound`. Returns false when
    /// the bound passed and the remaining tasks were abandoned. The caller flushes the
    /// store.
    pub async fn stop(mut self, bound: Duration) -> bool {
        let actors = self.actors();
        let token = self.token.take();
        let ctx = self.ctx.clone();
        tokio::time::timeout(bound, async move {
            for a in actors {
                let _ = a.stop_and_wait(None, Some(ACTOR_STOP_BOUND)).await;
            }
            drop(token);
            ctx.cancel.cancel();
            ctx.tasks.close();
            ctx.tasks.wait().await;
        })
        .await
        .is_ok()
    }

    /// A crash (`kill -9`): every task is cancelled and every actor killed at once;
    /// nothing is snapshotted or flushed.
    pub async fn kill(mut self) {
        self.ctx.cancel.cancel();
        let actors = self.actors();
        for a in &actors {
            a.kill();
        }
        for a in &actors {
            let _ = tokio::time::timeout(ACTOR_STOP_BOUND, a.wait(None)).await;
        }
        self.ctx.tasks.close();
        let _ = tokio::time::timeout(ACTOR_STOP_BOUND, self.ctx.tasks.wait()).await;
        drop(self.token.take());
    }
}

/// A device shared by every start of a gateway (its own kept actor may fail and start
/// again; the device does not).
#[derive(Clone)]
struct SharedDevice {
    twin: TwinId,
    kind: AssetKind,
    device: Arc<std::sync::Mutex<Box<dyn Device>>>,
}

impl SharedDevice {
    fn new(device: Box<dyn Device>) -> Self {
        SharedDevice {
            twin: device.twin_id().clone(),
            kind: device.kind(),
            device: Arc::new(std::sync::Mutex::new(device)),
        }
    }
}

impl Device for SharedDevice {
    fn twin_id(&self) -> &TwinId {
        &self.twin
    }

    fn kind(&self) -> AssetKind {
        self.kind
    }

    fn poll(&mut self, now_ns: i64) -> Vec<crate::ports::Block> {
        self.device.lock().expect("device lock").poll(now_ns)
    }

    fn sightings(&mut self) -> Vec<crate::ports::Sighting> {
        self.device.lock().expect("device lock").sightings()
    }

    fn submit_setpoint(
        &mut self,
        ticket: u64,
        property: &str,
        value: f64,
    ) -> Option<crate::ports::SetpointOutcome> {
        self.device
            .lock()
            .expect("device lock")
            .submit_setpoint(ticket, property, value)
    }

    fn setpoint_outcomes(&mut self) -> Vec<(u64, crate::ports::SetpointOutcome)> {
        self.device.lock().expect("device lock").setpoint_outcomes()
    }

    fn status(&self) -> Option<crate::ports::DeviceStatus> {
        self.device.lock().expect("device lock").status()
    }
}

/// Publishes `NodeLoad` on `twinmesh/nodes/{node}/load` every second.
async fn publish_load(ctx: Arc<NodeContext>) {
    let mut tick = tokio::time::interval(LOAD_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let m = &ctx.metrics;
        let load = NodeLoad {
            node: ctx.node.to_string(),
            timestamp_ns: ctx.now_ns(),
            twins: ctx.directory.len() as u32,
            frames_in: NodeMetrics::get(&m.frames_in),
            samples_in: NodeMetrics::get(&m.samples_in),
            frames_duplicate: NodeMetrics::get(&m.frames_duplicate),
            frames_rejected: m
                .rejected()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            frames_published: NodeMetrics::get(&m.frames_published),
            bytes_published: NodeMetrics::get(&m.bytes_published),
            spool_frames: ctx.store.spool_len(),
            rpc_served: NodeMetrics::get(&m.rpc_served),
            frames_overflow: NodeMetrics::get(&m.frames_overflow),
        };
        if let Err(e) = ctx
            .fabric
            .put(&keys::node_load(&ctx.node), &load, Qos::Latest)
            .await
        {
            tracing::debug!("load not published: {e}");
        }
    }
}

/// The cloud stage `archive`: keeps the feature sets of twins whose chain asks for it,
/// as long-term time series (one series per feature) in the cloud node's store.
async fn archive_features(ctx: Arc<NodeContext>, features: Subscription) {
    while let Ok(sample) = features.rx.recv_async().await {
        let Ok(set) = sample.decode::<FeatureSet>() else {
            tracing::debug!(key = sample.key, "malformed feature set");
            continue;
        };
        if !set.archive {
            continue;
        }
        let Ok(twin) = set.twin_id.parse::<TwinId>() else {
            continue;
        };
        let points: Vec<StoredFrame> = set
            .features
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(name, v)| StoredFrame {
                signal: name.clone(),
                seq: 0,
                start_ns: set.window_end_ns,
                sample_period_ns: (set.window_end_ns - set.window_start_ns).max(1),
                samples: vec![*v],
                scale: 0.0,
            })
            .collect();
        if let Err(e) = ctx.store.append_frames(&twin, &points) {
            tracing::warn!(twin = %twin, "archive write failed: {e}");
        } else {
            NodeMetrics::add(&ctx.metrics.features_archived, points.len() as u64);
        }
    }
    drop(features);
}
