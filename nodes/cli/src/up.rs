//! `twinmesh up`: a whole mesh on one machine, in one process — one cloud node, two edge
//! sites (`site-a`, `site-b`) and one IoT gateway per site driving simulated assets. Each
//! node has its own Zenoh session and sled database, exactly as separate processes would.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use twinmesh_sim::model::SIMULATED_KINDS;
use twinmesh_twins::Tier;

use twinmesh_nodes::config::{NodeConfig, SimSpec, ZenohMode, CLOUD_SITE};
use twinmesh_nodes::RunningNode;

pub const SITES: [&str; 2] = ["site-a", "site-b"];

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub assets_per_kind: u32,
    /// gRPC of the cloud node; the other nodes take the following ports (or any free port
    /// when this one is 0).
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// Where the cloud node listens for outside Zenoh clients.
    pub zenoh: String,
    pub data: PathBuf,
    pub seed: u64,
    /// Edges passivate twins idle this many seconds (0: never).
    pub passivate_after_s: u64,
    /// Mutual TLS on every Zenoh link, TLS on gRPC (a CA and certificates under
    /// `data/certs`).
    pub secure: bool,
}

/// Where `up --secure` keeps its CA and node certificates.
pub fn certs_dir(data: &std::path::Path) -> PathBuf {
    data.join("certs")
}

/// The read-only client certificate `up --secure` issues (dashboards, `zenoh` tools).
pub const READER: &str = "reader";

/// The mesh key's file name under `data/keys`.
pub const MESH_KEY: &str = "mesh.key";

/// The ACL roster of the planned nodes: edge and cloud nodes are the mesh, IoT nodes
/// the gateways of their sites, plus one read-only client, [`READER`].
pub fn roster(nodes: &[NodeConfig]) -> anyhow::Result<twinmesh_nodes::acl::Roster> {
    let mut roster = twinmesh_nodes::acl::Roster {
        readers: vec![READER.parse()?],
        ..Default::default()
    };
    for n in nodes {
        match n.tier {
            Tier::Iot => roster
                .gateways
                .entry(n.site.clone())
                .or_default()
                .push(n.id.clone()),
            Tier::Edge | Tier::Cloud => roster.mesh.push(n.id.clone()),
        }
    }
    roster.validate()?;
    Ok(roster)
}

fn next_port(addr: SocketAddr, offset: u16) -> SocketAddr {
    let mut a = addr;
    if a.port() != 0 {
        a.set_port(a.port().saturating_add(offset));
    }
    a
}

/// The node configurations of the local mesh, cloud first. Edges and gateways get their
/// connect endpoints when started (`connect` is filled in by [`start`]).
pub fn plan(opts: &UpOptions) -> anyhow::Result<Vec<NodeConfig>> {
    let mut nodes = Vec::new();
    let mut cloud = NodeConfig::new("cloud".parse()?, Tier::Cloud, CLOUD_SITE);
    cloud.listen = vec![opts.zenoh.clone()];
    cloud.grpc = Some(opts.grpc);
    cloud.http = Some(opts.http);
    cloud.data = opts.data.join("cloud");
    nodes.push(cloud);
    for (i, site) in SITES.iter().enumerate() {
        let suffix = site.trim_start_matches("site-");
        let mut edge = NodeConfig::new(format!("edge-{suffix}").parse()?, Tier::Edge, site);
        edge.listen = vec!["tcp/127.0.0.1:0".into()];
        edge.grpc = Some(next_port(opts.grpc, 1 + i as u16));
        edge.data = opts.data.join(edge.id.as_str());
        edge.passivate_after_s = opts.passivate_after_s;
        nodes.push(edge);
    }
    for (i, site) in SITES.iter().enumerate() {
        let suffix = site.trim_start_matches("site-");
        let mut iot = NodeConfig::new(format!("iot-{suffix}").parse()?, Tier::Iot, site);
        iot.listen = vec!["tcp/127.0.0.1:0".into()];
        iot.grpc = Some(next_port(opts.grpc, 1 + SITES.len() as u16 + i as u16));
        iot.data = opts.data.join(iot.id.as_str());
        iot.seed = opts.seed;
        iot.simulate = SIMULATED_KINDS
            .iter()
            .map(|&kind| SimSpec {
                kind,
                count: opts.assets_per_kind,
            })
            .collect();
        nodes.push(iot);
    }
    if opts.secure {
        let certs = certs_dir(&opts.data);
        for n in nodes.iter_mut() {
            let tls = |eps: &mut Vec<String>| {
                for ep in eps.iter_mut() {
                    // QUIC, not Zenoh's tls/ link (eclipse-zenoh/zenoh#2557).
                    if let Some(rest) = ep.strip_prefix("tcp/") {
                        *ep = format!("quic/{rest}");
                    }
                }
            };
            tls(&mut n.listen);
            n.tls = Some(twinmesh_nodes::config::TlsConfig {
                ca_file: certs.join("ca.pem"),
                cert_file: certs.join(format!("{}.pem", n.id)),
                key_file: certs.join(format!("{}.key", n.id)),
            });
            n.acl_file = Some(certs.join("acl.toml"));
        }
    }
    // One site key per site, shared by its edge and gateway; the mesh key for the edges
    // and the cloud; a control key per site for its edge and gateway and the cloud
    // (all created on first start): even the default mesh believes no caller and no
    // message that a key does not prove.
    let keys = opts.data.join("keys");
    for n in nodes.iter_mut() {
        if n.tier != Tier::Cloud {
            n.site_key_file = Some(keys.join(format!("{}.key", n.site)));
        }
        if n.tier != Tier::Iot {
            n.mesh_key_file = Some(keys.join(MESH_KEY));
        }
        n.control_keys_dir = Some(keys.clone());
    }
    // Every node is a Zenoh router: a node (or a `twinmesh router`) on another machine
    // that connects to one of them in router mode reaches the whole mesh through it,
    // where peers would forward nothing between their neighbours (ARCHITECTURE.md,
    // "Through routers"). Outside clients connect to one node, as a client.
    for n in &mut nodes {
        n.mode = ZenohMode::Router;
        n.normalize()?;
    }
    Ok(nodes)
}

/// Starts the planned nodes in order, wiring each to the ones before it.
pub async fn start(mut plan: Vec<NodeConfig>) -> anyhow::Result<Vec<RunningNode>> {
    if let Some(tls) = plan.iter().find_map(|c| c.tls.as_ref()) {
        let dir = tls.ca_file.parent().unwrap_or(std::path::Path::new("."));
        if !tls.ca_file.exists() {
            twinmesh_nodes::certs::init_ca(dir, "twinmesh up CA", 3650)?;
        }
        let names = plan.iter().map(|c| c.id.as_str()).chain([READER]);
        for name in names {
            if !dir.join(format!("{name}.pem")).exists() {
                twinmesh_nodes::certs::issue(dir, name, &[], 365)?;
            }
        }
    }
    // The roster follows the plan on every start.
    if let Some(path) = plan.iter().find_map(|c| c.acl_file.clone()) {
        let text = toml::to_string(&roster(&plan)?)?;
        std::fs::write(
            &path,
            format!("# Written by `twinmesh up --secure` on every start.\n{text}"),
        )
        .map_err(|e| anyhow::anyhow!("cannot write ACL roster {}: {e}", path.display()))?;
    }
    let control_keys = plan.iter().filter_map(|c| {
        let dir = c.control_keys_dir.as_ref()?;
        (c.tier != Tier::Cloud).then(|| dir.join(format!("{}.control.key", c.site)))
    });
    let key_files: Vec<PathBuf> = plan
        .iter()
        .filter_map(|c| c.site_key_file.clone())
        .chain(plan.iter().filter_map(|c| c.mesh_key_file.clone()))
        .chain(control_keys)
        .collect();
    for key in key_files {
        if !key.exists() {
            twinmesh_nodes::keys::new_key_file(&key, "k1")?;
        }
    }
    let mut running: Vec<RunningNode> = Vec::new();
    for cfg in plan.iter_mut() {
        let cloud = running
            .iter()
            .find(|n| n.config.tier == Tier::Cloud)
            .map(|n| n.locators.clone())
            .unwrap_or_default();
        let site_edges: Vec<String> = running
            .iter()
            .filter(|n| n.config.tier == Tier::Edge && n.config.site == cfg.site)
            .flat_map(|n| n.locators.clone())
            .collect();
        // Edges reach the cloud; gateways reach their site's edge directly (so the site
        // keeps working without the cloud) and the cloud.
        cfg.connect = site_edges.into_iter().chain(cloud).collect();
        match RunningNode::start(cfg.clone()).await {
            Ok(node) => running.push(node),
            Err(e) => {
                for n in running.into_iter().rev() {
                    let _ = n.stop().await;
                }
                return Err(anyhow::Error::from(e).context(format!("starting node {}", cfg.id)));
            }
        }
    }
    Ok(running)
}

/// Runs the local mesh until `shutdown`.
pub async fn up(opts: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let nodes = start(plan(&opts)?).await?;
    println!(
        "twinmesh mesh is up ({} nodes, data in {}):",
        nodes.len(),
        opts.data.display()
    );
    for n in &nodes {
        println!(
            "  {:<8} {:<5} {:<7} grpc {:<17} zenoh {}{}",
            n.config.id.as_str(),
            n.config.tier.as_str(),
            n.config.site,
            n.grpc_addr.map(|a| a.to_string()).unwrap_or_default(),
            n.locators.join(","),
            n.http_addr
                .map(|a| format!("  dashboard http://{a}"))
                .unwrap_or_default(),
        );
        if !n.config.simulate.is_empty() {
            let assets: Vec<String> = n.config.simulate.iter().map(|s| s.to_string()).collect();
            println!("           simulating {}", assets.join(", "));
        }
    }
    println!("try: twinmesh ctl twins   |   twinmesh ctl watch site-a/wt-01   |   Ctrl-C to stop");
    shutdown.cancelled().await;
    println!("stopping...");
    for n in nodes.into_iter().rev() {
        n.stop().await?;
    }
    println!("stopped; storage flushed");
    Ok(())
}
