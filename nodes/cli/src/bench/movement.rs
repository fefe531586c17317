//! `bench migrate` and `bench failover`: how long a twin is away when it moves.

use std::time::{Duration, Instant};

use serde::Serialize;

use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::proto::GetTwinRequest;
use twinmesh_twins::Tier;

use super::rig::*;
use super::BenchArgs;
use twinmesh_nodes::config::{NodeConfig, CLOUD_SITE};
use twinmesh_nodes::RunningNode;

#[derive(Debug, Serialize)]
pub(crate) struct MoveReport {
    pub(crate) machine: String,
    pub(crate) runs: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) lease_ms: u64,
}

impl MoveReport {
    /// The report of `runs` moves that each kept the twin away `times` ms.
    fn new(runs: usize, times: Vec<f64>, lease_ms: u64) -> MoveReport {
        let (p50_ms, p99_ms, max_ms) = percentiles(times);
        MoveReport {
            machine: machine(),
            runs,
            p50_ms,
            p99_ms,
            max_ms,
            lease_ms,
        }
    }
}

/// A cloud, two edges of one site and a gateway streaming one wind turbine, in-process.
async fn movement_rig(dir: &std::path::Path) -> anyhow::Result<Vec<RunningNode>> {
    let mut nodes: Vec<RunningNode> = Vec::new();
    let plan = [
        ("bench-cloud", Tier::Cloud, CLOUD_SITE),
        ("bench-edge-1", Tier::Edge, "bench"),
        ("bench-edge-2", Tier::Edge, "bench"),
        ("bench-iot", Tier::Iot, "bench"),
    ];
    for (id, tier, site) in plan {
        let mut cfg = NodeConfig::new(id.parse()?, tier, site);
        cfg.listen = vec!["tcp/127.0.0.1:0".into()];
        cfg.connect = nodes.iter().flat_map(|n| n.locators.clone()).collect();
        cfg.grpc = (tier == Tier::Cloud)
            .then(|| "127.0.0.1:0".parse())
            .transpose()?;
        cfg.data = dir.join(id);
        if tier == Tier::Iot {
            cfg.simulate = vec!["wind_turbine:1"
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?];
        }
        cfg.normalize()?;
        nodes.push(RunningNode::start(cfg).await?);
    }
    Ok(nodes)
}

pub(super) async fn bench_migrate(args: &BenchArgs) -> anyhow::Result<MoveReport> {
    use twinmesh_proto::v1::mesh_service_client::MeshServiceClient;
    use twinmesh_twins::proto::MigrateTwinRequest;
    let dir = tempfile::tempdir()?;
    let nodes = movement_rig(dir.path()).await?;
    let endpoint = format!("http://{}", nodes[0].grpc_addr.expect("grpc"));
    let mut twins = TwinServiceClient::connect(endpoint.clone()).await?;
    let mut mesh = MeshServiceClient::connect(endpoint).await?;
    let id = "bench/wt-01".to_owned();
    // Streaming first.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = twins
            .get_twin(GetTwinRequest {
                twin_id: id.clone(),
            })
            .await
        {
            if t.get_ref()
                .reported
                .get("bearing_vibration")
                .is_some_and(|v| v.seq > 10)
            {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the twin did not start streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = (args.parallel * 5).clamp(5, 200);
    let mut durations = Vec::new();
    for i in 0..runs {
        let target = if i % 2 == 0 {
            "bench-edge-2"
        } else {
            "bench-edge-1"
        };
        let current = twins
            .get_twin(GetTwinRequest {
                twin_id: id.clone(),
            })
            .await?
            .into_inner();
        let target = if current.placement.as_ref().is_some_and(|p| p.node == target) {
            if target == "bench-edge-1" {
                "bench-edge-2"
            } else {
                "bench-edge-1"
            }
        } else {
            target
        };
        let r = mesh
            .migrate_twin(MigrateTwinRequest {
                twin_id: id.clone(),
                target_node: target.into(),
                target_tier: String::new(),
                unpin: false,
            })
            .await?
            .into_inner();
        durations.push(r.duration_ns as f64 / 1e6);
        // Let ingestion settle on the new node between moves.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for n in nodes.into_iter().rev() {
        n.stop().await?;
    }
    Ok(MoveReport::new(runs, durations, 2000))
}

/// Separate `twinmesh node` processes, so a node can really be `kill -9`ed.
pub(super) async fn bench_failover(args: &BenchArgs) -> anyhow::Result<MoveReport> {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let lease_ms = 2000u64;
    struct Proc {
        child: tokio::process::Child,
        args: Vec<String>,
        zenoh: String,
        grpc: String,
    }
    async fn spawn(exe: &std::path::Path, args: Vec<String>) -> anyhow::Result<Proc> {
        let mut child = tokio::process::Command::new(exe)
            .arg("node")
            .args(&args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await??
            .ok_or_else(|| anyhow::anyhow!("node exited before it was ready"))?;
        let field = |k: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .map(|v| v.split(',').next().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        Ok(Proc {
            zenoh: field("zenoh="),
            grpc: field("grpc="),
            child,
            args,
        })
    }
    let base = |tier: &str, id: &str, site: &str, connect: &[String]| {
        let mut a: Vec<String> = [
            "--tier",
            tier,
            "--id",
            id,
            "--listen",
            "tcp/127.0.0.1:0",
            "--lease-ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(lease_ms.to_string());
        a.extend([
            "--data".to_owned(),
            dir.path().join(id).display().to_string(),
        ]);
        if !site.is_empty() {
            a.extend(["--site".to_owned(), site.to_owned()]);
        }
        for c in connect {
            a.extend(["--connect".to_owned(), c.clone()]);
        }
        a
    };
    let mut cloud_args = base("cloud", "cloud", "", &[]);
    cloud_args.extend(["--grpc".to_owned(), "127.0.0.1:0".to_owned()]);
    let cloud = spawn(&exe, cloud_args).await?;
    let mut edges = Vec::new();
    for id in ["edge-1", "edge-2"] {
        edges.push(
            spawn(
                &exe,
                base("edge", id, "bench", std::slice::from_ref(&cloud.zenoh)),
            )
            .await?,
        );
    }
    let mut iot_args = base(
        "iot",
        "iot",
        "bench",
        &[
            edges[0].zenoh.clone(),
            edges[1].zenoh.clone(),
            cloud.zenoh.clone(),
        ],
    );
    iot_args.extend(["--simulate".to_owned(), "power_meter:1".to_owned()]);
    let _iot = spawn(&exe, iot_args).await?;
    let endpoint = format!("http://{}", cloud.grpc);
    let mut twins = TwinServiceClient::connect(endpoint).await?;
    let id = "bench/pm-01".to_owned();
    let node_of = |t: &twinmesh_twins::proto::Twin| {
        t.placement
            .as_ref()
            .map(|p| p.node.clone())
            .unwrap_or_default()
    };
    let mut times = Vec::new();
    let runs = args.parallel.clamp(1, 20);
    for _ in 0..runs {
        let deadline = Instant::now() + Duration::from_secs(30);
        let home = loop {
            if let Ok(t) = twins
                .get_twin(GetTwinRequest {
                    twin_id: id.clone(),
                })
                .await
            {
                let n = node_of(t.get_ref());
                if !n.is_empty() && t.get_ref().reported.contains_key("voltage") {
                    break n;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the twin did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let victim = if home == "edge-1" { 0 } else { 1 };
        edges[victim].child.start_kill()?;
        let killed = Instant::now();
        let _ = edges[victim].child.wait().await;
        loop {
            if let Ok(t) = twins
                .get_twin(GetTwinRequest {
                    twin_id: id.clone(),
                })
                .await
            {
                let n = node_of(t.get_ref());
                if !n.is_empty() && n != home {
                    break;
                }
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "no failover within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(killed.elapsed().as_secs_f64() * 1e3);
        // Bring the killed edge back on its port and data.
        let mut again = edges[victim].args.clone();
        let i = again.iter().position(|a| a == "--listen").expect("listen");
        again[i + 1] = edges[victim].zenoh.clone();
        edges[victim] = spawn(&exe, again).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(MoveReport::new(runs, times, lease_ms))
}
