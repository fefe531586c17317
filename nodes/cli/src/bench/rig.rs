//! What every measurement shares: a cloud + edge rig in this process, the machine
//! description, resident memory, the `scale` twins, and polling with progress.

use std::time::{Duration, Instant};

use zenoh::bytes::Encoding;

use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::proto::{GetTwinRequest, Placement, PlacementRequest};
use twinmesh_twins::Tier;

use twinmesh_nodes::client::request_placement;
use twinmesh_nodes::config::{NodeConfig, CLOUD_SITE};
use twinmesh_nodes::RunningNode;

/// A cloud and an edge node in this process, and a peer session acting as the gateway;
/// with a `tls` or `quic` scheme, every link is mutual TLS (certificates of a fresh CA).
pub(crate) struct Rig {
    /// Holds the rig's databases, certificates and keys until it is dropped.
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) cloud: RunningNode,
    pub(crate) edge: RunningNode,
    pub(crate) gateway: zenoh::Session,
    /// The edge's site key (the gateway seals protected signals with it).
    pub(crate) site_key: twinmesh_actors::seal::KeyRing,
    /// What the gateway session proves its frames with (the site's control key).
    pub(crate) gateway_trust: twinmesh_actors::trust::Trust,
}

impl Rig {
    /// Plain TCP links.
    pub(crate) async fn start() -> anyhow::Result<Rig> {
        Self::start_with("tcp", twinmesh_nodes::config::default_lease_ms()).await
    }

    /// Links of `scheme` (`tcp`, or `tls`/`quic` with mutual TLS), the nodes' liveliness
    /// lease in ms.
    pub(crate) async fn start_with(scheme: &str, lease_ms: u64) -> anyhow::Result<Rig> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let tls = scheme != "tcp";
        let tls_of = |name: &str| -> anyhow::Result<Option<twinmesh_nodes::config::TlsConfig>> {
            if !tls {
                return Ok(None);
            }
            let (cert, key) = twinmesh_nodes::certs::issue(&certs, name, &[], 2)?;
            Ok(Some(twinmesh_nodes::config::TlsConfig {
                ca_file: certs.join("ca.pem"),
                cert_file: cert,
                key_file: key,
            }))
        };
        if tls {
            twinmesh_nodes::certs::init_ca(&certs, "bench CA", 2)?;
        }
        let key_file = dir.path().join("bench.key");
        twinmesh_nodes::keys::new_key_file(&key_file, "k1")?;
        let site_key = twinmesh_nodes::config::load_key_ring(&key_file, "site key")?;
        // The keys `up` gives: the mesh key to both nodes, the site's control key to
        // every node and to the gateway.
        let keys = dir.path().join("keys");
        let mesh_key = keys.join("mesh.key");
        twinmesh_nodes::keys::new_key_file(&mesh_key, "k1")?;
        let control_key = keys.join("bench.control.key");
        twinmesh_nodes::keys::new_key_file(&control_key, "k1")?;
        let gateway_trust = twinmesh_actors::trust::Trust::new("bench-gateway", "bench")
            .with_site_key(&site_key)
            .with_control_key(
                "bench",
                &twinmesh_nodes::config::load_key_ring(&control_key, "control key")?,
            );
        let mut cloud = NodeConfig::new("bench-cloud".parse()?, Tier::Cloud, CLOUD_SITE);
        cloud.listen = vec![format!("{scheme}/127.0.0.1:0")];
        cloud.grpc = Some("127.0.0.1:0".parse()?);
        cloud.data = dir.path().join("cloud");
        cloud.tls = tls_of("bench-cloud")?;
        cloud.lease_ms = lease_ms;
        cloud.mesh_key_file = Some(mesh_key.clone());
        cloud.control_keys_dir = Some(keys.clone());
        cloud.normalize()?;
        let cloud = RunningNode::start(cloud).await?;
        let mut edge = NodeConfig::new("bench-edge".parse()?, Tier::Edge, "bench");
        edge.listen = vec![format!("{scheme}/127.0.0.1:0")];
        edge.connect = cloud.locators.clone();
        edge.grpc = Some("127.0.0.1:0".parse()?);
        edge.data = dir.path().join("edge");
        edge.cache_mb = 256;
        edge.tls = tls_of("bench-edge")?;
        edge.lease_ms = lease_ms;
        edge.site_key_file = Some(key_file);
        edge.mesh_key_file = Some(mesh_key);
        edge.control_keys_dir = Some(keys);
        edge.normalize()?;
        let edge = RunningNode::start(edge).await?;
        let mut c = zenoh::Config::default();
        let set = |c: &mut zenoh::Config, k: &str, v: String| {
            c.insert_json5(k, &v)
                .map_err(|e| anyhow::anyhow!("{k}: {e}"))
        };
        if let Some(t) = tls_of("bench-gateway")? {
            let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
            set(
                &mut c,
                "transport/link/tls/root_ca_certificate",
                q(&t.ca_file),
            )?;
            set(
                &mut c,
                "transport/link/tls/connect_certificate",
                q(&t.cert_file),
            )?;
            set(
                &mut c,
                "transport/link/tls/connect_private_key",
                q(&t.key_file),
            )?;
            set(&mut c, "transport/link/tls/enable_mtls", "true".into())?;
        }
        set(&mut c, "mode", "\"peer\"".into())?;
        set(&mut c, "listen/endpoints", "[]".into())?;
        set(
            &mut c,
            "connect/endpoints",
            serde_json::to_string(&[edge.locators.clone(), cloud.locators.clone()].concat())?,
        )?;
        set(&mut c, "scouting/multicast/enabled", "false".into())?;
        let gateway = zenoh::open(c)
            .await
            .map_err(|e| anyhow::anyhow!("gateway session: {e}"))?;
        Ok(Rig {
            _dir: dir,
            cloud,
            edge,
            gateway,
            site_key,
            gateway_trust,
        })
    }

    /// A gRPC channel to the cloud node (TLS when the rig is).
    pub(crate) async fn cloud_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let addr = self.cloud.grpc_addr.expect("grpc");
        Ok(match &self.cloud.config.tls {
            Some(t) => {
                twinmesh_nodes::client::connect_tls(
                    &format!("https://{addr}"),
                    Duration::from_secs(30),
                    Some(&t.ca_file),
                )
                .await?
            }
            None => {
                twinmesh_nodes::client::connect_tls(
                    &format!("http://{addr}"),
                    Duration::from_secs(30),
                    None,
                )
                .await?
            }
        })
    }

    /// A gateway publisher of the telemetry frames of `signal` of twin `id`, blocking
    /// (not dropping) when Zenoh is congested.
    pub(crate) async fn frame_publisher(
        &self,
        id: &str,
        signal: &str,
    ) -> anyhow::Result<zenoh::pubsub::Publisher<'static>> {
        self.gateway
            .declare_publisher(format!("twinmesh/telemetry/{id}/{signal}"))
            .encoding(Encoding::from(
                <twinmesh_proto::v1::TelemetryFrame as twinmesh_proto::Wire>::ENCODING,
            ))
            .congestion_control(zenoh::qos::CongestionControl::Block)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Registers `n` twins of `bench` and waits until each answers.
    pub(crate) async fn twins(&self, n: usize, kind: &str) -> anyhow::Result<Vec<String>> {
        let ids: Vec<String> = (1..=n).map(|i| format!("bench/twin-{i:03}")).collect();
        for id in &ids {
            let mut req = PlacementRequest {
                twin_id: id.clone(),
                kind: kind.into(),
                gateway: "bench".into(),
                chain: None,
                thing_model: String::new(),
                proof: None,
            };
            self.gateway_trust.prove("bench", &mut req);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let placed = request_placement(&self.gateway, &req)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .is_some_and(|p| p.status == "active");
                if placed {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "twin {id} was not placed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut client = TwinServiceClient::new(self.cloud_channel().await?);
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(30);
            while client
                .get_twin(GetTwinRequest {
                    twin_id: id.clone(),
                })
                .await
                .is_err()
            {
                anyhow::ensure!(Instant::now() < deadline, "twin {id} did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(ids)
    }

    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.gateway.close().await;
        self.edge.stop().await?;
        Ok(self.cloud.stop().await?)
    }
}

pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    format!("{cpus} cpus, {model}")
}

/// Resident memory of this process, bytes.
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The twin ids of `bench scale`: kinds in turn, `{prefix}-{n}` on the site `bench`.
pub(crate) fn scale_placement(prefix: &str, i: usize, node: &str) -> Placement {
    let kind = twinmesh_twins::AssetKind::ALL[i % twinmesh_twins::AssetKind::ALL.len()];
    Placement {
        twin_id: format!("bench/{prefix}{}-{i:07}", kind.prefix()),
        node: node.into(),
        tier: Tier::Edge.to_string(),
        epoch: 1,
        kind: kind.to_string(),
        site: "bench".into(),
        status: twinmesh_actors::mesh::STATUS_ACTIVE.into(),
        reason: String::new(),
        initial_chain: None,
        proof: None,
        pinned: false,
        site_only: false,
    }
}

pub(crate) const SCALE_NODE: &str = "bench-edge";

pub(crate) fn scale_node_config(data: &std::path::Path) -> anyhow::Result<NodeConfig> {
    let mut cfg = NodeConfig::new(SCALE_NODE.parse()?, Tier::Edge, "bench");
    cfg.listen = vec!["tcp/127.0.0.1:0".into()];
    cfg.data = data.to_path_buf();
    cfg.cache_mb = 64;
    Ok(cfg)
}

/// Polls `count` every 100 ms until it reaches `total` or `bound` passes; prints
/// progress every 5 s.
pub(crate) async fn wait_for(
    what: &str,
    total: usize,
    bound: Duration,
    mut count: impl FnMut() -> usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let n = count();
        if n >= total {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < bound,
            "{what}: {n} of {total} after {bound:?}"
        );
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {what}: {n} of {total} ({:.0} s)",
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// p50, p99 and max of `v`.
pub(crate) fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), *v.last().unwrap_or(&0.0))
}
