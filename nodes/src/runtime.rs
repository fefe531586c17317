//! One node process: opens its store and Zenoh session, starts the actors its tier needs,
//! serves its info/twins queryables, gRPC and the dashboard, and stops cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tokio_util::sync::CancellationToken;

use twinmesh_actors::assembly::{Assembly, NodeParts};
use twinmesh_actors::context::{NodeContext, TwinConfig};
use twinmesh_actors::gateway::{GatewayConfig, GatewayMsg};
use twinmesh_actors::mesh::MeshMsg;
use twinmesh_actors::node::NodeMsg;
use twinmesh_actors::ports::{
    Clock, Device, Durable, SeriesStore, SharedFabric, SharedStore, SystemClock,
};
use twinmesh_actors::tasks::TaskController;
use twinmesh_sim::{Fault, SimDevice};
use twinmesh_twins::proto::NodeInfo;
use twinmesh_twins::TwinId;

use crate::api::Api;
use crate::config::NodeConfig;
use crate::fabric::ZenohFabric;
use crate::models;
use crate::store::SledStore;
use crate::{grpc, http};

/// How long shutdown may take before remaining tasks are abandoned.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

/// A started node. Drop does not stop it: call [`RunningNode::stop`].
pub struct RunningNode {
    pub config: NodeConfig,
    pub grpc_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    /// Zenoh locators the node listens on.
    pub locators: Vec<String>,
    pub ctx: Arc<NodeContext>,
    pub fabric: Arc<ZenohFabric>,
    pub store: Arc<SledStore>,
    /// Values the device adapters refused, by reason.
    pub device_counters: Arc<crate::devices::DeviceCounters>,
    assembly: Assembly,
    servers: CancellationToken,
    /// The device adapters' I/O tasks.
    device_tasks: TaskController,
}

/// Simulated devices of an IoT node, named `{site}/{prefix}-{nn}`, with their faults
/// (fault times count from `start_ns`).
pub fn simulated_devices(cfg: &NodeConfig, start_ns: i64) -> crate::Result<Vec<Box<dyn Device>>> {
    let mut devices: Vec<Box<dyn Device>> = Vec::new();
    let mut unused: Vec<&str> = cfg.faults.iter().map(|f| f.asset.as_str()).collect();
    for spec in &cfg.simulate {
        for n in 1..=spec.count {
            let asset = format!("{}-{n:02}", spec.kind.prefix());
            let id = TwinId::new(&cfg.site, &asset)?;
            let faults: Vec<Fault> = cfg
                .faults
                .iter()
                .filter(|f| f.asset == asset)
                .map(|f| Fault {
                    mode: f.mode.clone(),
                    at_ns: f.at_ns(start_ns),
                })
                .collect();
            unused.retain(|a| *a != asset);
            let device = SimDevice::new(id, spec.kind, cfg.seed)
                .with_faults(&faults)
                .map_err(|e| crate::Error::config(format!("asset {asset}: {e}")))?;
            devices.push(Box::new(device));
        }
    }
    if let Some(a) = unused.first() {
        return Err(crate::Error::config(format!(
            "fault for unknown asset {a:?}: this node simulates no such asset"
        )));
    }
    Ok(devices)
}

impl RunningNode {
    /// Starts a node. Errors (bad address, locked database, unusable endpoint) are
    /// reported before anything is left half-started.
    pub async fn start(config: NodeConfig) -> crate::Result<Self> {
        Self::start_with(config, TwinConfig::default(), GatewayConfig::default()).await
    }

    pub async fn start_with(
        config: NodeConfig,
        twin_config: TwinConfig,
        gateway_config: GatewayConfig,
    ) -> crate::Result<Self> {
        // This node's own kinds (a config made in code has not loaded them yet; loading
        // the same models again changes nothing).
        if let Some(dir) = &config.models_dir {
            crate::kinds::load_dir(dir)?;
        }
        let mut devices = simulated_devices(&config, SystemClock.now_ns())?;
        let checked = crate::devices::check_all(&config.devices, &config.site)
            .map_err(crate::Error::config)?;
        // Bind the servers first: a taken port fails the start with one clear line.
        let grpc_listener = match config.grpc {
            Some(addr) => Some(grpc::bind(addr).await?),
            None => None,
        };
        let http_listener = match config.http {
            Some(addr) => Some(http::bind(addr).await?),
            None => None,
        };
        let auth = crate::auth::Authenticator::load(&config.auth)?;
        let site_key = match &config.site_key_file {
            Some(path) => Some(Arc::new(crate::config::load_key_ring(path, "site key")?)),
            None => None,
        };
        let (trust, trust_warnings) = crate::config::load_trust(&config, site_key.as_deref())?;
        let trust = Arc::new(trust);
        let at_rest = match &config.at_rest_key_file {
            Some(path) => Some(crate::store::AtRest {
                keys: Arc::new(crate::config::load_key_ring(path, "at-rest key")?),
                trees: config.encrypt_trees.clone(),
            }),
            None => None,
        };
        let store = Arc::new(SledStore::open_with(
            &config.data,
            config.cache_mb,
            at_rest,
        )?);
        let fabric = Arc::new(ZenohFabric::open(&config).await?);
        for w in trust_warnings {
            tracing::warn!("{w}");
        }
        let locators = fabric.locators().await;
        let shared_fabric: SharedFabric = fabric.clone();
        let grpc_addr = grpc_listener.as_ref().and_then(|l| l.local_addr().ok());
        let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
        let chains = config
            .chains
            .iter()
            .map(|(kind, spec)| Ok((*kind, twinmesh_twins::chain::Chain::validate(spec, *kind)?)))
            .collect::<Result<_, twinmesh_twins::chain::ChainError>>()?;
        // Real devices: their I/O runs in tasks of their own, ended on stop.
        let device_counters = Arc::new(crate::devices::DeviceCounters::default());
        let device_tasks = TaskController::new(
            tokio_util::task::TaskTracker::new(),
            CancellationToken::new(),
        );
        devices.extend(crate::devices::start(
            checked,
            config.id.as_str(),
            &config.data,
            &device_counters,
            &device_tasks,
        ));
        let assembly = Assembly::start(NodeParts {
            node: config.id.clone(),
            tier: config.tier,
            site: config.site.clone(),
            fabric: shared_fabric.clone(),
            store: store.clone() as SharedStore,
            clock: Arc::new(SystemClock),
            twin_config: TwinConfig {
                max_frame_bytes: config.max_frame_bytes,
                passivate_after: match config.passivate_after_s {
                    0 => twin_config.passivate_after,
                    s => Some(Duration::from_secs(s)),
                },
                site_budget: config.site_budget(),
                ..twin_config
            },
            analysis_permits: std::thread::available_parallelism().map_or(2, |n| n.get()),
            site_key,
            trust: trust.clone(),
            info: NodeInfo {
                capacity: config.capacity,
                locators: locators.clone(),
                grpc_addr: grpc_addr.map(|a| a.to_string()).unwrap_or_default(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ..Default::default()
            },
            devices,
            gateway: gateway_config,
            chains,
        })
        .await;
        let assembly = match assembly {
            Ok(a) => a,
            Err(e) => {
                device_tasks.terminate(SHUTDOWN_BOUND).await;
                return Err(e.into());
            }
        };
        let ctx = assembly.ctx.clone();
        let registry = assembly.registry.clone();

        let servers = CancellationToken::new();
        let api = Api::new(shared_fabric, &config.site, trust.clone())
            .with_rpc_latency(ctx.metrics.latency.rpc.clone());
        // The gRPC services; the dashboard's actions go through them too.
        let services = grpc::Services {
            api: api.clone(),
            auth: auth.clone(),
            cancel: servers.clone(),
            tasks: ctx.tasks.clone(),
            health: assembly.health.clone(),
            models: models::Models {
                api: api.clone(),
                ctx: ctx.clone(),
                cloud: registry.map(|r| (store.clone() as Arc<dyn SeriesStore>, r)),
            },
        };
        if let Some(listener) = grpc_listener {
            let services = services.clone();
            let cancel = servers.clone();
            let tls = config.tls.clone();
            ctx.tasks.spawn(async move {
                if let Err(e) = grpc::serve(listener, services, tls, cancel).await {
                    tracing::error!("gRPC server stopped: {e}");
                }
            });
        }
        if let Some(listener) = http_listener {
            let state = http::HttpState {
                api,
                ctx: ctx.clone(),
                store: store.clone(),
                auth,
                services,
                live_streams: Arc::new(tokio::sync::Semaphore::new(http::MAX_LIVE_STREAMS)),
                devices: device_counters.clone(),
            };
            let (cancel, tls, tasks) = (servers.clone(), config.tls.clone(), ctx.tasks.clone());
            ctx.tasks.spawn(async move {
                if let Err(e) = http::serve(listener, state, tls, tasks, cancel).await {
                    tracing::error!("HTTP server stopped: {e}");
                }
            });
        }
        ctx.tasks.spawn(crate::router::warn_peer_behind_routers(
            fabric.session().clone(),
            config.id.to_string(),
            config.mode,
            servers.clone(),
        ));
        let exposed = config.exposed_plaintext();
        if !exposed.is_empty() {
            tracing::warn!(node = %config.id, ?exposed, "--insecure: plaintext listeners on non-loopback addresses");
        }
        tracing::info!(node = %config.id, tier = %config.tier, site = config.site, ?locators, ?grpc_addr, ?http_addr, "node started");
        Ok(RunningNode {
            config,
            grpc_addr,
            http_addr,
            locators,
            ctx,
            fabric,
            store,
            device_counters,
            assembly,
            servers,
            device_tasks,
        })
    }

    /// Edge and cloud nodes: the node supervisor, while it runs (it is restarted when
    /// it fails).
    pub fn supervisor(&self) -> Option<ActorRef<NodeMsg>> {
        self.assembly.supervisor.as_ref()?.get()
    }

    /// Cloud nodes: the placement authority, while it runs.
    pub fn mesh(&self) -> Option<ActorRef<MeshMsg>> {
        self.assembly.mesh.as_ref()?.get()
    }

    /// IoT nodes: the gateway, while it runs.
    pub fn gateway(&self) -> Option<ActorRef<GatewayMsg>> {
        self.assembly.gateway.as_ref()?.get()
    }

    /// One line a script (or a test) can parse: `ready node=... grpc=... zenoh=...`.
    pub fn ready_line(&self) -> String {
        format!(
            "ready node={} tier={} site={} grpc={} http={} zenoh={}",
            self.config.id,
            self.config.tier,
            self.config.site,
            self.grpc_addr.map(|a| a.to_string()).unwrap_or_default(),
            self.http_addr.map(|a| a.to_string()).unwrap_or_default(),
            self.locators.join(",")
        )
    }

    /// Stops servers and actors, flushes storage and closes the session, within a bound.
    pub async fn stop(self) -> crate::Result<()> {
        self.servers.cancel();
        if !self.device_tasks.terminate(SHUTDOWN_BOUND).await {
            tracing::warn!(node = %self.config.id, "device tasks took longer than {SHUTDOWN_BOUND:?} to end");
        }
        if !self.assembly.stop(SHUTDOWN_BOUND).await {
            tracing::warn!(node = %self.config.id, "shutdown took longer than {SHUTDOWN_BOUND:?}; abandoning remaining tasks");
        }
        self.store.flush().await?;
        self.fabric.close().await;
        tracing::info!(node = %self.config.id, "node stopped; storage flushed");
        Ok(())
    }
}

/// Runs a node until `shutdown` fires (the binary passes Ctrl-C).
pub async fn run(config: NodeConfig, shutdown: CancellationToken) -> crate::Result<()> {
    let node = RunningNode::start(config).await?;
    println!("{}", node.ready_line());
    shutdown.cancelled().await;
    node.stop().await
}
